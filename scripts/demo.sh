#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job: the whole chain on the embedded default.
# Arguments go to `python -m pipelines.demo` (default: --out out/demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- --out out/demo; fi
exec .venv/bin/python -m pipelines.demo "$@"
