# convserve: a builder stage makes /opt/venv; a slim runtime serves it as a non-root user.
#
#   docker build -t convserve .                                       CPU torch (PyTorch's CPU index)
#   docker build -t convserve:cuda --build-arg TORCH_FLAVOUR=cuda .   CUDA torch from PyPI
#   docker run --rm -p 127.0.0.1:8000:8000 --stop-timeout 40 convserve
#
# Wheels placed in docker/wheelhouse/ (git-ignored) replace every package index, so the build
# needs no network at all (`make docker-test` builds that way). See README.md, "Deploy".

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# cpu: torch (and torchvision) from TORCH_CPU_INDEX; cuda: PyPI's torch, which bundles CUDA.
ARG TORCH_FLAVOUR=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# pyproject.toml extras to install; torchvision serves resnet18, mobilenet_v3_small, ...
ARG EXTRAS=torchvision
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CONFIG_FILE=/opt/pip.conf
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY docker/wheelhouse/ /wheelhouse/
COPY docker/requirements.py pyproject.toml ./
# Requirements before the source, so the torch layer is rebuilt only when pyproject.toml changes.
RUN set -eu; \
    python3 requirements.py pyproject.toml "$EXTRAS" > requirements.txt; \
    if ls /wheelhouse/*.whl > /dev/null 2>&1; then \
        echo "installing from docker/wheelhouse/ only (no index)"; \
        printf '[global]\nno-index = true\nfind-links = /wheelhouse\n' > "$PIP_CONFIG_FILE"; \
    else \
        printf '[global]\n' > "$PIP_CONFIG_FILE"; \
        case "$TORCH_FLAVOUR" in \
            cpu) grep -E '^torch(vision)?[<>=!~; []' requirements.txt > torch.txt; \
                 /opt/venv/bin/pip install --index-url "$TORCH_CPU_INDEX" -r torch.txt ;; \
            cuda) ;; \
            *) echo "TORCH_FLAVOUR=$TORCH_FLAVOUR: expected cpu or cuda" >&2; exit 1 ;; \
        esac; \
    fi; \
    /opt/venv/bin/pip install -r requirements.txt
COPY README.md ./
COPY service/ service/
# torch's C++ test binaries and headers serve no purpose without a compiler (-145 MB), nor
# does the Swagger Editor that swagger-ui-py ships beside the Swagger UI /schema serves (-23 MB).
RUN /opt/venv/bin/pip install --no-deps . \
    && rm -r /opt/venv/lib/python3*/site-packages/torch/test /opt/venv/lib/python3*/site-packages/torch/include \
    && rm /opt/venv/lib/python3*/site-packages/swagger_ui/static/swagger-editor* \
    && /opt/venv/bin/python -c "import service.app, torch; print('torch', torch.__version__)"


FROM ${BASE_IMAGE} AS runtime
ARG TORCH_FLAVOUR=cpu
LABEL org.opencontainers.image.title="convserve" \
      org.opencontainers.image.description="Image classification for CNNs: batching, Grad-CAM heatmaps, Prometheus metrics" \
      org.opencontainers.image.licenses="MIT" \
      dev.convserve.torch-flavour="${TORCH_FLAVOUR}"
RUN groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin convserve
COPY --from=builder /opt/venv /opt/venv
# The bundled models, owned by root: the service only reads its store. Mount your own store
# read-only over /models (docker run -v "$PWD/my_store:/models:ro") to serve it instead.
COPY model_store/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=8000 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_STORE=/models \
    CONVSERVE_CACHE_DIR=/tmp/convserve \
    CONVSERVE_DRAIN_S=30
# Numeric, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
# 8000: HTTP; 8001: the Open Inference Protocol over gRPC
EXPOSE 8000 8001
# SIGTERM drains: not ready at once, admitted requests finish (up to CONVSERVE_DRAIN_S), exit 0.
# Docker's default stop timeout (10 s) is shorter than the drain: run with --stop-timeout 40
# (compose: stop_grace_period: 40s; Kubernetes: terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
# No curl in slim images: the venv's Python asks /health/ready (200 once every model is warm).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:' + os.environ.get('CONVSERVE_PORT', '8000') + '/health/ready', timeout=4)"]
ENTRYPOINT ["convserve"]
CMD ["serve"]
