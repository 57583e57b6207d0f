# syntax=docker/dockerfile:1
# RunPod serverless worker for Z-Image-Turbo, weights baked in (docs/DEPLOY.md).
#   docker build -t z-image-worker .                                    # fast mode only
#   docker build --build-arg WITH_PULID=1 --secret id=hf_token,env=HF_TOKEN -t z-image-worker:pulid .
#
# CUDA "base" is enough: torch brings its CUDA, cuDNN and NCCL libraries as pip packages; the driver
# comes from the host. The base's CUDA (13.0) is the one torch 2.13.0 on PyPI is built for, so the
# NVIDIA runtime refuses, with a clear message, a host whose driver is too old (needs >= 580).
# Pin the digest too once you have pulled it (docker buildx imagetools inspect).
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# python3-dev + g++: torch.compile (Triton, Inductor) builds small C extensions at run time.
# libgl1 + libglib2.0-0: opencv-python (insightface) needs libGL.so.1 at import.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ libgl1 libglib2.0-0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt requirements-gpu.txt ./
# torch==2.13.0 from PyPI is the Linux CUDA 13.0 build (its wheel requires cuda-toolkit 13.0 and
# nvidia-cudnn-cu13). PyTorch publishes no CUDA 12.8 build of 2.12 or later.
RUN pip install -r requirements-gpu.txt

# Weights before the code, so a code change does not download them again. Z-Image-Turbo is pinned
# at a commit and verified against the hub's hashes for it; its fp32 transformer is then stored in
# bf16 (what the worker serves on CUDA) in the same step, so no layer ever holds the fp32 bytes.
ARG WITH_PULID=0
ARG ALLOW_UNPINNED=0
COPY builder/ builder/
RUN --mount=type=secret,id=hf_token,required=false \
    HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
    python -m builder.fetch_models --target /models \
        $([ "$WITH_PULID" = 1 ] && echo --with-pulid) \
        $([ "$ALLOW_UNPINNED" = 1 ] && echo --allow-unpinned) \
    && python -m builder.to_bf16 /models/z-image-turbo

COPY . .

ENV MODEL_DIR=/models/z-image-turbo \
    PULID_MODEL_DIR=/models/pulid-flux \
    PULID_ENABLED=${WITH_PULID} \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RUNPOD_LOG_LEVEL=INFO \
    COMPILE_CACHE_DIR=/cache/torch-compile \
    PYTHONUNBUFFERED=1

CMD ["python", "-u", "handler.py"]
