# syntax=docker/dockerfile:1
# The light side: the `farm` CLI and SDK, `farm dashboard` and Flower (`farm.flower`). No torch,
# no diffusers: submitting, watching and fetching need neither.
#
#   docker build -f infra/client.Dockerfile -t render-farm-client .
#   docker run --rm -e FARM_REDIS_URL=... -e FARM_STORAGE=s3://... render-farm-client farm batch list
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/render-farm
COPY pyproject.toml README.md ./
COPY farm farm
COPY workers workers
# The package without its worker extra; checked to hold no torch.
RUN pip install ".[flower]" \
 && python -c "import importlib.util as u, sys; sys.exit('torch installed' if u.find_spec('torch') else 0)"

RUN useradd --create-home --uid 10001 farm
USER farm
CMD ["farm", "--help"]
