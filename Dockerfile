# nemo_sdsearch for clusters: the NGC NeMo container that still ships TensorRT-LLM (26.04 carries
# TRT-LLM 1.2.x, PyTorch, Transformer Engine, megatron-core), plus faiss-gpu and this project.
#
#   docker build -t nemo_sdsearch:latest .
#   enroot import -o nemo_sdsearch.sqsh dockerd://nemo_sdsearch:latest   # for pyxis (CONTAINER_IMAGE)
#
# The image's own torch / megatron-core / transformers are kept: every pip install below is
# constrained to the versions already in the image (nothing the image ships is upgraded).
ARG BASE_IMAGE=nvcr.io/nvidia/nemo:26.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SDSEARCH_HOME=/opt/nemo_sdsearch

WORKDIR /opt/nemo_sdsearch

# Fail early if the base image lost what imports without a GPU. TensorRT-LLM and Transformer Engine load CUDA
# libraries at import and fail on build hosts without a GPU driver: check them at run time on a GPU node with
#   srun --gpus=1 --container-image=$CONTAINER_IMAGE python /opt/nemo_sdsearch/scripts/check_image.py
RUN python -c "import megatron.core, torch; print('torch', torch.__version__, 'mcore', megatron.core.__version__)" \
    && pip show tensorrt_llm transformer_engine > /dev/null

# Pin everything the image already has, then add faiss-gpu and the project's remaining dependencies. A
# dependency range of pyproject.toml that excludes an image version fails this install: constraints/ngc-26.04.txt
# records the 26.04 image's versions (from public sources) and tests/test_ngc_constraints.py checks the ranges
# against them without building the image (the retrieval server's uvicorn range among them: see docs/retrieval.md).
# One pin per name, the version Python imports (scripts/image_constraints.py: `pip list` would pin a package once per
# site-packages that holds it, and two versions of one name make the install unresolvable).
COPY scripts/image_constraints.py /opt/image_constraints.py
RUN python /opt/image_constraints.py --exclude nemo-sdsearch > /opt/image-constraints.txt

COPY pyproject.toml README.md ./
COPY nemo_sdsearch ./nemo_sdsearch
COPY retrieval ./retrieval
COPY conf ./conf
COPY slurm ./slurm
COPY bench ./bench
COPY scripts ./scripts

# The `gpu` extra brings faiss-gpu and no faiss-cpu (the two install the same `faiss` module, so the image must
# hold exactly one: the check below fails the build otherwise); `data` brings pyarrow for Search-R1 parquet files.
RUN pip install -c /opt/image-constraints.txt -e ".[gpu,data]" \
    && python -c "import importlib.metadata as m; both = {'faiss-cpu', 'faiss-gpu-cu12'} <= {d.metadata['Name'].lower() for d in m.distributions()}; assert not both, 'faiss-cpu and faiss-gpu are both installed'" \
    && python -c "import nemo_sdsearch.retrieval, faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus())" \
    && sdsearch --help > /dev/null

# Nothing is downloaded at run time: mount models, indexes and data (see docs/cluster.md).
CMD ["sdsearch", "--help"]
