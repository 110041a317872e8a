#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image without any image registry.
#
# Hospitals (and these test machines) often cannot pull `python:3.11-slim`. debootstrap fetches
# Debian packages from a plain apt mirror (or a local one) into a root filesystem, and
# `docker import` turns that tree into an image. Mosquitto is included so the same image can run
# the federation's broker. Idempotent: does nothing when the tag already exists (FORCE=1 rebuilds).
#
# Usage: scripts/build_base_image.sh [TAG]      (default local/debian-python:bookworm)
# Env:   MIRROR=http://deb.debian.org/debian  SUITE=bookworm  FORCE=1
# Needs: root (debootstrap), debootstrap, a running Docker engine.
set -euo pipefail
TAG=${1:-local/debian-python:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,mosquitto

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "build_base_image: $TAG already exists (FORCE=1 to rebuild)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "build_base_image: debootstrap needs root; run with sudo" >&2
  exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
  echo "build_base_image: debootstrap is missing; install it with: apt-get install debootstrap" >&2
  exit 1
}

ROOTFS=$(mktemp -d /var/tmp/neurofed-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
echo "build_base_image: debootstrap $SUITE from $MIRROR into $ROOTFS (about a minute)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
  tail -20 "$ROOTFS.log" >&2
  echo "build_base_image: debootstrap failed (full log: $ROOTFS.log)" >&2
  exit 1
}
rm -f "$ROOTFS.log"
# Trim what a runtime base never needs: apt lists, docs, caches.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG" >/dev/null
echo "build_base_image: built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
