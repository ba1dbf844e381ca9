"""Megatron's padded vocabulary size: the one rule, for the model builder, the vocab-parallel losses and the
memory estimate alike (integer arithmetic only)."""


def pad_vocab_size(vocab: int, tp: int = 1, multiple: int = 128) -> int:
    """`vocab` rounded up to a multiple of `multiple * tp` (megatron's `make_vocab_size_divisible_by *
    tensor_model_parallel_size`): the rows of the embedding and the LM head, split evenly over the TP ranks."""
    if vocab < 1 or tp < 1 or multiple < 1:
        raise ValueError(f"vocab, tp and multiple must be >= 1; got {vocab}, {tp}, {multiple}")
    m = multiple * tp
    return -(-vocab // m) * m
