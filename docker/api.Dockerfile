# The HTTP API: FastAPI + uvicorn, the `service` extra only (no torch), as a non-root user.
#   docker build -f docker/api.Dockerfile -t vmoba-serve-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app
# Only what the API needs: the package metadata and the torch-free `service` package.
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY service ./service
RUN pip install ".[service]" \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin vmoba \
    && mkdir -p /data \
    && chown vmoba /data
COPY docker/api-entrypoint.sh /usr/local/bin/api-entrypoint.sh

USER vmoba
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/healthz\", timeout=2)"]
ENTRYPOINT ["/bin/sh", "/usr/local/bin/api-entrypoint.sh"]
