"""Loading Hugging Face causal LMs and tokenizers from local directories (never from a hub)."""

from __future__ import annotations

from pathlib import Path


def load_model_and_tokenizer(path: str | Path, device: str | None = None, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json); give a local path "
                                "holding a Hugging Face causal LM (nothing is downloaded at run time)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, tokenizer
