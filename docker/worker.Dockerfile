# The GPU worker: CUDA runtime, torch + triton + diffusers (the `worker` extra), the VMoBA kernels,
# run as a non-root user. `python -m worker` starts one worker process per visible GPU.
#   docker build -f docker/worker.Dockerfile -t vmoba-serve-worker .
# CPU-only image (MODEL=tiny): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX_URL=""
ARG VMOBA_COMMIT=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DATA_DIR=/data \
    HF_HOME=/models \
    TRITON_CACHE_DIR=/models/triton \
    TORCHINDUCTOR_CACHE_DIR=/models/inductor \
    VMOBA_COMMIT=${VMOBA_COMMIT}

# Triton compiles a small C launcher at first use: it needs a C compiler and Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vmoba ./vmoba
COPY contract ./contract
COPY service ./service
COPY worker ./worker
# torch stays pinned by the extra; TORCH_INDEX_URL only picks the wheel flavour (e.g. CPU).
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"; \
    fi \
    && pip install ".[worker]" \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin vmoba \
    && mkdir -p /data /models \
    && chown vmoba /data /models

USER vmoba
# Results shared with the API; downloaded models and compiled kernels survive restarts.
VOLUME ["/data", "/models"]
# The launcher forwards SIGTERM: each worker finishes its job or puts it back in the queue.
STOPSIGNAL SIGTERM
# Healthy once a worker on this host has loaded its model and sends heartbeats.
HEALTHCHECK --interval=15s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python", "-m", "worker.health"]
CMD ["python", "-m", "worker"]
