"""Runtime smoke check of the cluster image's GPU stack (run on a GPU node, inside the container):

    srun --gpus=1 --container-image=$CONTAINER_IMAGE python /opt/nemo_sdsearch/scripts/check_image.py

TensorRT-LLM and Transformer Engine load CUDA libraries at import and fail on a host without a GPU driver,
so `docker build` (on build hosts without one) checks only what imports without a GPU; this script checks the
rest where it can run. It prints one line per component and exits non-zero when one is missing or broken.
"""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    failed = 0
    for name, version in (("torch", "__version__"), ("megatron.core", "__version__"),
                          ("transformer_engine", "__version__"), ("tensorrt_llm", "__version__"),
                          ("faiss", "__version__"), ("nemo_sdsearch", "__version__")):
        try:
            module = importlib.import_module(name)
            print(f"ok    {name} {getattr(module, version, '?')}")
        except Exception as e:  # noqa: BLE001 - report every broken component, then fail
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
    try:
        import torch

        n = torch.cuda.device_count()
        print(f"{'ok  ' if n else 'FAIL'}  CUDA devices: {n}" + "".join(
            f"\n        {i}: {torch.cuda.get_device_name(i)}" for i in range(n)))
        failed += n == 0
        import faiss

        print(f"ok    faiss GPUs: {faiss.get_num_gpus()}")
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL  CUDA: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
