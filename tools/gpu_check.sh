#!/usr/bin/env bash
# GPU check of issue 17, for a short window on a machine with an NVIDIA GPU (sized for < 8 minutes):
# installs what it needs, builds cuda bundles of the reference model (uniform:8, uniform:4, a mixed
# plan), compares greedy tokens with the CPU bundles, times decode (tok/s, effective GB/s vs copy
# bandwidth) against torch eager fp16, reads NVML J/token, and prints one table.
#   tools/gpu_check.sh [--dry-run] [driver options: see python tools/gpu_check.py --help]
# Env: VENV (default .venv-gpu; reused when present), PYTHON (python3), SKIP_INSTALL=1 to use the
# current python as is, TORCH_INDEX (default https://download.pytorch.org/whl/cu128).
# Fails soft: a stage that fails becomes a "failed: ..." note in the table; exit 1 if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" >&2; }

DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,power.limit --format=csv,noheader >&2 \
    || log "nvidia-smi failed"
else
  log "no nvidia-smi on PATH"
fi

PIP_OPTS=(--quiet --retries 1 --timeout 15)   # a machine without network fails fast, then uses what it has
if [ "${SKIP_INSTALL:-0}" = 1 ] || [ "$DRY" = 1 ]; then
  PY=${PYTHON:-python3}
else
  VENV=${VENV:-.venv-gpu}
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV (with the system's site-packages: a preinstalled torch/TVM is reused)"
    "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" || { echo "error: cannot create $VENV" >&2; exit 2; }
  fi
  PY="$VENV/bin/python"
  # torch with CUDA first (the fp16 baseline and the copy bandwidth); without it that row says so
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    log "installing torch (CUDA build)"
    "$PY" -m pip install "${PIP_OPTS[@]}" torch --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}" >&2 \
      || log "no CUDA torch installed: the torch fp16 row will say so"
  fi
  log "installing moec[dev], nvidia-ml-py, cuda-bindings (NVRTC for TVM's CUDA runtime)"
  "$PY" -m pip install "${PIP_OPTS[@]}" -e '.[dev]' >&2 || log "pip install -e .[dev] failed (offline?): using what is installed"
  "$PY" -m pip install "${PIP_OPTS[@]}" nvidia-ml-py >&2 || log "nvidia-ml-py did not install: no J/token"
  "$PY" -m pip install "${PIP_OPTS[@]}" cuda-bindings >&2 || log "cuda-bindings did not install: TVM compiles with nvcc"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import tvm, torch, onnx, click, tokenizers, pydantic, yaml, safetensors" 2>/dev/null; then
  echo "error: $PY lacks moec's dependencies (tvm, torch, onnx, click, tokenizers, pydantic, pyyaml, safetensors) and pip could not install them" >&2
  exit 2
fi
# TVM compiles the bundle's embedded CUDA source at load time: NVRTC (cuda-bindings) or nvcc
if ! "$PY" -c "import cuda.bindings" 2>/dev/null; then export TVM_CUDA_COMPILE_MODE=nvcc; fi
for d in /usr/local/cuda/bin; do [ -d "$d" ] && export PATH="$PATH:$d"; done

log "running the driver ($PY tools/gpu_check.py $*)"
exec timeout "${GPU_CHECK_TIMEOUT:-450}" "$PY" tools/gpu_check.py "$@"
