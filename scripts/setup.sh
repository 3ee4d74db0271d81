#!/usr/bin/env bash
# Create .venv (once) and install the project with every extra. Safe to rerun: pip skips what
# is already there. PyTorch comes first, pinned, because other packages would otherwise pull
# whatever torch build they like.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -c constraints.txt -e '.[all,test]'
