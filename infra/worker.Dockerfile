# syntax=docker/dockerfile:1
# A farm worker: `farm worker` with the CUDA build of torch. One container (or pod) per GPU.
#
#   docker build -f infra/worker.Dockerfile -t render-farm-worker .
#   docker run --gpus device=0 -e FARM_REDIS_URL=... -e FARM_STORAGE=s3://... \
#       -v /srv/models:/models:ro render-farm-worker
#
# torch comes from PyTorch's CUDA wheel index (the wheels carry the CUDA runtime, so a slim
# Python base is enough; the host needs only the NVIDIA driver and container toolkit), and is
# installed before the farm so pip keeps that build. Models are mounted, never downloaded.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# 1. The CUDA build of torch, checked: a CPU wheel here would make a worker that cannot see a GPU.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'not a CUDA build of torch')"

# 2. The farm with its worker extra (diffusers, transformers, peft, ...).
WORKDIR /opt/render-farm
COPY pyproject.toml README.md ./
COPY farm farm
COPY workers workers
RUN pip install ".[worker]" \
 && python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch was replaced')"

# 3. A non-root user; models and the Hugging Face cache are mounted read-only.
RUN useradd --create-home --uid 10001 farm && mkdir -p /models && chown farm /models
USER farm
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/home/farm/.cache/huggingface \
    FARM_MODELS_DIR=/models
VOLUME ["/models"]

# SIGTERM (docker stop, a pod deleted): the job in hand is handed back at its next step.
STOPSIGNAL SIGTERM
CMD ["farm", "worker", "--device", "cuda:0"]
