#!/usr/bin/env bash
# Separate virtual environments for the peer benchmark (benchmarks/peer_compare.py), so the kit's
# own .venv never gets flwr or nvflare (their grpcio/protobuf pins would leak into the kit).
#
#   scripts/peer_env.sh            # Flower:  .cache/peer-venv
#   scripts/peer_env.sh --flare    # also NVIDIA FLARE: .cache/flare-venv (its own env: its pins
#                                  # conflict with Flower's)
#
# torch==2.13.0 goes in first (the CPU wheel on the local disk, so nothing pulls a CUDA build),
# then MONAI and the few packages the kit's trainer imports. The kit itself is not installed:
# the peer apps put the repository root on PYTHONPATH and use edge_node.training unchanged, so
# every framework runs the very same training code. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${PEER_TORCH:-torch==2.13.0}
COMMON=(monai==1.6.1 "nibabel>=5" "scipy>=1.11" "safetensors>=0.4" "numpy>=1.26" psutil)

make_env() {  # make_env DIR PACKAGE...
  local dir=$1; shift
  local want
  want=$(echo "$TORCH ${COMMON[*]} $*" | sha256sum | cut -c1-16)
  if [ -f "$dir/.peer-installed" ] && [ "$(cat "$dir/.peer-installed")" = "$want" ]; then
    echo "peer_env: $dir is ready"
    return 0
  fi
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip >/dev/null
  "$dir/bin/python" -c "import torch" 2>/dev/null || "$dir/bin/pip" install -q "$TORCH"
  "$dir/bin/pip" install -q "${COMMON[@]}" "$@"
  echo "$want" > "$dir/.peer-installed"
  echo "peer_env: $dir ready ($*)"
}

make_env .cache/peer-venv "flwr>=1.20,<2"
if [ "${1:-}" = "--flare" ] || [ "${PEER_FLARE:-0}" = 1 ]; then
  make_env .cache/flare-venv "nvflare>=2.5"
fi
