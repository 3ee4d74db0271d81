#!/usr/bin/env bash
# Regenerate the image's hash-locked requirements from PyPI, for the image's platform (Linux
# x86_64, CPython 3.11, wheels only), at the versions constraints.txt pins:
#   docker/requirements-torch.txt  torch, torchvision and what they need (the image's first layer)
#   docker/requirements.txt        everything `pip install .[all]` needs, torch's layer included,
#                                  plus setuptools to build the project without build isolation
# Run it after changing pyproject.toml or constraints.txt and commit both files; the Dockerfile
# installs them with --require-hashes, so a rebuild gets the same wheels byte for byte.
# Needs uv on PATH (or UV=/path/to/uv), e.g. `python3 -m venv /tmp/uv && /tmp/uv/bin/pip install uv`.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --only-binary :all:
        --generate-hashes --index-url https://pypi.org/simple -c constraints.txt
        --custom-compile-command scripts/lock-image.sh --quiet)
printf 'torch\ntorchvision\n' \
  | "$uv" pip compile "${common[@]}" -o docker/requirements-torch.txt -
printf 'setuptools>=68\n' \
  | "$uv" pip compile "${common[@]}" -c docker/requirements-torch.txt --extra all \
      -o docker/requirements.txt pyproject.toml -
