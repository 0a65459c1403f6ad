#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py) on a lent device machine.
#
# That machine reaches no package registry: it runs its own image's python3
# (Python 3.12 with JAX and its CUDA plugin, optax, chex, orbax, opencv,
# pillow, ...) and this project's other packages travel as wheels in .whl/
# (ignored by git). Two steps:
#
#   1. Here, once (needs PyPI):       bash benchmarks/run_gpu.sh fetch
#   2. On the device, with carry=[".whl"]:
#                                      bash benchmarks/run_gpu.sh
#      Extra arguments go to gpu.py, e.g. bash benchmarks/run_gpu.sh --budget_s=300
#
# Results land in $OUT (gpu.json, gpu.md, gpu.log), written case by case, so
# a run cut short still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

# Pinned as in requirements.txt where listed there; the rest are the
# versions pip resolves in our CPU venv. Packages already on the device
# image (jax, numpy, optax, chex, orbax-checkpoint, absl-py, etils, protobuf,
# opencv-python-headless, pillow, pyarrow, ...) are not carried.
BINARY_WHEELS=(
  dm-haiku==0.0.17 jmp==0.0.4 ml-collections==1.1.0
  grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10 simplejpeg==1.9.0
  tensorflow-datasets==4.9.10 importlib-resources==7.1.0
  immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  termcolor==3.3.0 toml==0.10.2 tensorboardX==2.6.5 portpicker==1.6.0
)
# Published as source only (pure Python): built into a wheel here.
SOURCE_ONLY=(promise==2.3)

fetch() {
  mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEELS" "${BINARY_WHEELS[@]}" || exit 1
  python3 -m pip wheel -q --no-deps -w "$WHEELS" "${SOURCE_ONLY[@]}" || exit 1
  ls -l "$WHEELS"
  du -sh "$WHEELS"
}

if [[ "${1:-}" == fetch ]]; then
  fetch
  exit
fi

# --- on the device machine ---
: "${OUT:?OUT is not set: run this through the device tool (or set OUT=DIR)}"
export PYTHONUNBUFFERED=1
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "run_gpu.sh: no wheels in $WHEELS/: run 'bash benchmarks/run_gpu.sh" \
       "fetch' here first and pass carry=[\"$WHEELS\"] to the device tool." >&2
  exit 2
fi
SITE=/tmp/nfnets_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== $(date -u +%FT%TZ) $(uname -m), $(nproc) CPUs"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader 2>&1
  python3 - <<'EOF'
import importlib.metadata as md, sys
import jax
print('python', sys.version.split()[0], '| devices:', jax.devices())
def version(name):
  try:
    return md.version(name)
  except md.PackageNotFoundError:
    return 'MISSING'
print(' '.join(f'{n}=={version(n)}' for n in (
    'jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'dm-haiku',
    'optax', 'chex', 'orbax-checkpoint', 'numpy', 'protobuf', 'etils',
    'grain', 'tensorflow-datasets', 'ml-collections')))
EOF
} 2>&1 | tee "$OUT/gpu.log"
python3 benchmarks/gpu.py --out_dir="$OUT" "$@" 2>&1 | tee -a "$OUT/gpu.log"
