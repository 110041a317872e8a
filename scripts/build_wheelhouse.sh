#!/usr/bin/env bash
# Build a wheelhouse for air-gapped image builds: run on a machine with internet access, carry the
# folder to the hospital, then `docker build --network none .` installs only from it.
#
# Every runtime dependency of the kit (from pyproject.toml, with the chosen onnxruntime flavour)
# is downloaded as a wheel, or built into one when the index has only a source archive, plus
# setuptools and wheel to build the kit itself. The wheels must match the image's Python and
# platform: run this with the same Python minor version as the base image (3.11 for
# python:3.11-slim and Debian bookworm), on Linux x86_64.
#
# Usage: scripts/build_wheelhouse.sh [DIR]            (default: wheelhouse/, which the Dockerfile reads)
# Env:   ORT_FLAVOR=cpu|gpu     onnxruntime (CPU) or onnxruntime-gpu (CUDA); never both
#        TORCH_INDEX=URL        extra index for torch (default: the PyTorch CPU index, so the
#                               multi-GB CUDA build is not fetched; for GPU use e.g.
#                               https://download.pytorch.org/whl/cu126; empty: PyPI only)
#        CONSTRAINTS=FILE       pip constraints (e.g. `pip freeze` of a tested environment)
#        PYTHON=python3.11      the interpreter whose pip downloads
#        FORCE=1                rebuild even when the stamp says the wheelhouse is current
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheelhouse}
ORT_FLAVOR=${ORT_FLAVOR:-cpu}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
PYTHON=${PYTHON:-python3}

case "$ORT_FLAVOR" in
  cpu | gpu) ;;
  *) echo "build_wheelhouse: ORT_FLAVOR must be cpu or gpu, not '$ORT_FLAVOR'" >&2; exit 2 ;;
esac

reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PYTHON" docker/requirements.py pyproject.toml --extra "$ORT_FLAVOR" >"$reqs"
printf 'setuptools>=68\nwheel\n' >>"$reqs"

# The stamp records what the wheelhouse was built for; an unchanged one is reused as it is.
stamp_want=$({ cat "$reqs"; echo "flavor=$ORT_FLAVOR"; [ -n "${CONSTRAINTS:-}" ] && cat "$CONSTRAINTS"; "$PYTHON" -c 'import sys; print(sys.version_info[:2])'; } | sha256sum | cut -c1-16)
if [ "${FORCE:-0}" != 1 ] && [ -f "$DIR/.stamp" ] && [ "$(cat "$DIR/.stamp")" = "$stamp_want" ]; then
  echo "build_wheelhouse: $DIR is current ($(find "$DIR" -name '*.whl' | wc -l) wheels)"
  exit 0
fi

extra=()
if [ -n "$TORCH_INDEX" ]; then
  # An unreachable extra index makes pip retry for minutes; check it once, quickly.
  if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=8)' "$TORCH_INDEX/" >/dev/null 2>&1; then
    extra+=(--extra-index-url "$TORCH_INDEX")
  else
    echo "build_wheelhouse: warning: $TORCH_INDEX is not reachable; torch comes from the default index / find-links" >&2
  fi
fi
[ -n "${CONSTRAINTS:-}" ] && extra+=(--constraint "$CONSTRAINTS")

mkdir -p "$DIR"
echo "build_wheelhouse: fetching wheels for $("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') ($ORT_FLAVOR) into $DIR"
# (The filter drops a harmless pip warning some mirrors' configurations print once per package.)
"$PYTHON" -m pip wheel --quiet --wheel-dir "$DIR" "${extra[@]}" -r "$reqs" 2>&1 |
  { grep -v "is ignored: it is neither a file nor a directory" || true; }
if [ "$ORT_FLAVOR" = cpu ]; then rm -f "$DIR"/onnxruntime_gpu-*.whl; else rm -f "$DIR"/onnxruntime-[0-9]*.whl; fi
echo "$stamp_want" >"$DIR/.stamp"
echo "build_wheelhouse: $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
