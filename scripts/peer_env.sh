#!/usr/bin/env bash
# Separate virtual environments for the peer benchmark (benchmarks/peer_compare.py), so the kit's
# own .venv never gets flwr or nvflare (their grpcio/protobuf pins would leak into the kit).
#
#   scripts/peer_env.sh              # Flower: .cache/peer-venv, and NVIDIA FLARE: .cache/flare-venv
#   scripts/peer_env.sh --no-flare   # Flower only (PEER_FLARE=0 does the same)
#   scripts/peer_env.sh --flare-only # NVIDIA FLARE only
#
# FLARE gets an environment of its own: its pins conflict with Flower's.
# torch==2.13.0 goes in first (the CPU wheel on the local disk, so nothing pulls a CUDA build),
# then the framework and MONAI and the few packages the kit's trainer imports (for FLARE the
# framework first, alone, so that the kit's packages have to fit around nvflare's pins, not the
# other way round). The kit itself is installed editable with --no-deps (no mlflow, paho or
# onnxruntime there): every framework runs the very same neurofed.edge_node.training code, and
# each environment is checked by importing it from outside the repository. Idempotent: a stamp
# records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${PEER_TORCH:-torch==2.13.0}
COMMON=(monai==1.6.1 "nibabel>=5" "scipy>=1.11" "safetensors>=0.4" "numpy>=1.26" psutil)

make_env() {  # make_env DIR [--framework-first] PACKAGE...
  local dir=$1; shift
  local first=0
  if [ "${1:-}" = "--framework-first" ]; then first=1; shift; fi
  local want
  want=$(echo "$TORCH ${COMMON[*]} $* kit:$(sha256sum pyproject.toml | cut -c1-16)" | sha256sum | cut -c1-16)
  if [ -f "$dir/.peer-installed" ] && [ "$(cat "$dir/.peer-installed")" = "$want" ]; then
    echo "peer_env: $dir is ready"
    return 0
  fi
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip >/dev/null
  "$dir/bin/python" -c "import torch" 2>/dev/null || "$dir/bin/pip" install -q "$TORCH"
  if [ "$first" = 1 ]; then
    "$dir/bin/pip" install -q "$@"
    "$dir/bin/pip" install -q "${COMMON[@]}"
  else
    "$dir/bin/pip" install -q "${COMMON[@]}" "$@"
  fi
  local log; log=$(mktemp)
  "$dir/bin/pip" install -q --no-deps -e . >"$log" 2>&1 \
    || { cat "$log" >&2; rm -f "$log"; echo "peer_env: installing the kit into $dir failed" >&2; return 1; }
  rm -f "$log"
  (abs=$(cd "$dir" && pwd) && cd / && "$abs/bin/python" -c "import torch, neurofed.edge_node.training, neurofed.models.config") \
    || { echo "peer_env: $dir cannot import the kit's trainer" >&2; return 1; }
  echo "$want" > "$dir/.peer-installed"
  echo "peer_env: $dir ready ($*)"
}

flower=1
flare=${PEER_FLARE:-1}
case "${1:-}" in
  "") ;;
  --flare) flare=1 ;;  # the default now; kept for older instructions
  --no-flare) flare=0 ;;
  --flare-only) flower=0; flare=1 ;;
  *) echo "usage: $0 [--no-flare | --flare-only]" >&2; exit 2 ;;
esac
# pytest: tests/coordinator/test_aggregate.py checks FedAvg against flwr's own aggregate here
if [ "$flower" = 1 ]; then make_env .cache/peer-venv "flwr>=1.20,<2" pytest; fi
# bitsandbytes: FLARE's quantization filters import it (even its fp16 one); benchmarks/links.py
# checks which of them run on a CPU
if [ "$flare" = 1 ]; then make_env .cache/flare-venv --framework-first "nvflare>=2.9,<2.10" bitsandbytes; fi
