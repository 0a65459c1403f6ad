#!/usr/bin/env bash
# Creates .venv-peers (timm + CPU torch, for benchmarks/peers.py) and checks
# that timm's nf_resnet50 builds and runs one forward. Never touches .venv.
#
#   bash benchmarks/setup_peers.sh            # PYTHON=python3.11 by default
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
venv=.venv-peers
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet -r benchmarks/requirements-peers.txt
"$venv/bin/pip" check
build=$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "cpu")')
if [ "$build" != cpu ]; then
  echo "note: torch in $venv is a CUDA $build build (PyPI's default); it" \
       "runs on CPU, but the CPU wheel (torch==2.13.0+cpu) is smaller." >&2
fi
"$venv/bin/python" -m benchmarks.peers_timm --check
