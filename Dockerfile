# syntax=docker/dockerfile:1
# The image every MulT stage runs in: on the Ray cluster launcher's nodes (cluster/aws.yaml), in
# KubeRay pods (cluster/kuberay/) and in the RayJob submitter. Build and push:
#   docker build -t REGISTRY/mult:0.1.0 . && docker push REGISTRY/mult:0.1.0
# A rebuild installs the same bytes: the base image by digest, every Python package by exact
# version and sha256 (docker/requirements*.txt), the project from the build context.
#
# Base: Ray's GPU image for exactly the Ray that pyproject.toml pins (2.60.0), Python 3.11, and
# CUDA 13.0, the CUDA that the torch==2.14.1 wheel is built for (torch.version.cuda == "13.0").
# `rayproject/ray-ml` stopped after 2.49; this image has Ray but no torch, so torch comes below.
# The digest is not filled in yet (no registry was reachable where this file was written): the
# build stops at FROM until scripts/pin-base-image.sh has written it below; commit the result.
# The image runs as Ray's non-root user `ray` (uid 1000). No credentials are baked in: S3 access
# comes at run time from the node's instance profile or the pod's service-account role.
ARG RAY_IMAGE_DIGEST
FROM rayproject/ray:2.60.0-py311-cu130@${RAY_IMAGE_DIGEST}

LABEL org.opencontainers.image.title="mult" \
      org.opencontainers.image.description="MulT multitask Swin transformer on Ray: shards, Train, Tune, evaluation" \
      org.opencontainers.image.version="0.1.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# COPY --chown creates /home/ray/mult owned by `ray`, so pip can write its build files there.
COPY --chown=ray:users docker/requirements-torch.txt docker/requirements.txt /home/ray/mult/
WORKDIR /home/ray/mult

# The locks (scripts/lock-image.sh) pin every package and its sha256; --no-deps installs exactly
# them, wheels only, so nothing is resolved or compiled at build time.
# PyTorch first, in its own layer: it is most of the image and changes least often. The lock
# holds PyPI's torch 2.14.1 Linux wheel, the CUDA 13.0 build (its torch.__version__ is
# "2.14.1+cu130"), and the nvidia-*-cu13 wheels it loads.
RUN pip install --no-cache-dir --no-deps --require-hashes --only-binary :all: \
        --index-url https://pypi.org/simple -r requirements-torch.txt

# Everything else the stages import (the `all` extra: Ray's train/tune/default, storage, metrics),
# at the versions the tests ran with (constraints.txt); torch's layer is already in place. A layer
# of its own on purpose, so that a dependency change does not rebuild torch's.
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --no-deps --require-hashes --only-binary :all: \
        --index-url https://pypi.org/simple -r requirements.txt

COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users mult ./mult
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users configs ./configs

# The project itself, from the copied sources: no index, no dependencies, the locked setuptools.
# The import check fails the build if Ray or torch's CUDA is not what the cluster expects.
RUN pip install --no-cache-dir --no-deps --no-index --no-build-isolation . \
 && python -c "import ray, torch, mult, pipelines; assert ray.__version__ == '2.60.0', ray.__version__; assert torch.version.cuda == '13.0', torch.version.cuda"

# Ray's user `ray` by number, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 1000
