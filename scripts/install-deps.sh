#!/usr/bin/env bash
# Installs what Gear's build, tests, demo and benchmarks need on a fresh
# Debian 12 machine (Node 20, npm, python3, g++ and make are assumed). Safe to
# run again: it installs only what is missing.
set -euo pipefail

packages=(
  libzstd-dev          # the native addon links libzstd (format v3 members; runtime libzstd1 is in every Debian)
  docker.io            # dockerd 20.10: graph-driver plugin support
  docker-registry      # CNCF distribution 2.8: the local registry
  containerd           # containerd 1.6 and ctr
  fuse3                # fusermount3, /etc/fuse.conf
  busybox-static       # test images without any public registry
  debootstrap          # realistic test images (minbase rootfs)
  skopeo umoci         # image plumbing in tests
  golang-go golang-github-containerd-containerd-dev  # containerd's snapshotter conformance suite
  iproute2 attr zstd pigz util-linux
  fsverity             # `fsverity digest`: reference for the fs-verity digest tests
  systemd              # systemd-analyze verify of the installed units (test/integration/install.test.ts)
  python3-yaml         # parses deploy/kubernetes/*.yaml (test/unit/kubernetes-manifest.test.ts)
  fonts-dejavu-core    # text in `gear analyze --plot FILE.png` (resvg uses the system fonts)
)

. "$(dirname "${BASH_SOURCE[0]}")/lib/apt-install-missing.sh"
apt_install_missing install-deps "${packages[@]}"

# The overlay and fuse modules (built in on some kernels; modprobe may be absent).
modprobe overlay 2>/dev/null || true
modprobe fuse 2>/dev/null || true
