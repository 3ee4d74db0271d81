# syntax=docker/dockerfile:1
# The image every MulT stage runs in: on the Ray cluster launcher's nodes (cluster/aws.yaml), in
# KubeRay pods (cluster/kuberay/) and in the RayJob submitter. Build and push:
#   docker build -t REGISTRY/mult:0.1.0 . && docker push REGISTRY/mult:0.1.0
#
# Base: Ray's GPU image for exactly the Ray that pyproject.toml pins (2.60.0), Python 3.11, and
# CUDA 13.0, the CUDA that the torch==2.14.1 wheel is built for (torch.version.cuda == "13.0").
# `rayproject/ray-ml` stopped after 2.49; this image has Ray but no torch, so torch comes below.
# The image runs as Ray's non-root user `ray` (uid 1000). No credentials are baked in: S3 access
# comes at run time from the node's instance profile or the pod's service-account role.
FROM rayproject/ray:2.60.0-py311-cu130

LABEL org.opencontainers.image.title="mult" \
      org.opencontainers.image.description="MulT multitask Swin transformer on Ray: shards, Train, Tune, evaluation" \
      org.opencontainers.image.version="0.1.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# COPY --chown creates /home/ray/mult owned by `ray`, so pip can write its build files there.
COPY --chown=ray:users pyproject.toml constraints.txt /home/ray/mult/
WORKDIR /home/ray/mult

# PyTorch first, pinned, in its own layer: it is most of the image and changes least often,
# and installing it before the project keeps other packages from choosing another torch build.
# PyTorch's cu130 index serves the CUDA 13.0 build (2.14.1+cu130) whatever PyPI's default is.
RUN pip install --no-cache-dir -c constraints.txt --index-url https://download.pytorch.org/whl/cu130 \
        torch==2.14.1 torchvision==0.29.1

COPY --chown=ray:users mult ./mult
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users configs ./configs

# The project with the Ray, storage and metrics extras, at the versions the tests ran with.
# The import check fails the build if pip moved Ray off the version the cluster runs.
RUN pip install --no-cache-dir -c constraints.txt ".[all]" \
 && python -c "import ray, torch, mult, pipelines; assert ray.__version__ == '2.60.0', ray.__version__"

# Ray's user `ray` by number, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 1000
