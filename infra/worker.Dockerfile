# A farm worker with the CUDA build of torch. One container per GPU.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY farm farm
COPY workers workers
RUN pip install --no-cache-dir '.[worker]'
ENV HF_HUB_OFFLINE=1
ENTRYPOINT []
CMD ["farm", "worker", "--device", "cuda:0"]
