#!/usr/bin/env bash
# Installs what `make bench` needs beyond scripts/install-deps.sh (make test
# does not need any of it): the eStargz side of the cold-deploy benchmark
# (issue 11).
#
#   stargz-snapshotter                           ctr-remote 0.12: image convert --estargz,
#                                                image optimize, image rpull
#   golang-github-containerd-stargz-snapshotter-dev
#                                                the stargz library 0.12 (fs, fs/source,
#                                                snapshot) and, through its Depends, go-fuse,
#                                                containerd 1.6's Go sources, grpc, logrus …
#   golang-go golang-github-burntsushi-toml-dev golang-github-sirupsen-logrus-dev
#   golang-google-grpc-dev golang-github-containerd-containerd-dev
#                                                what bench/estargz/main.go imports directly
#
# Debian 12 ships no containerd-stargz-grpc daemon: bench/estargz/build.sh
# builds ours (bench/estargz/main.go) from these packages in GOPATH mode with
# Debian 12's Go 1.19. Safe to run again: installs only what is missing.
set -euo pipefail

packages=(
  stargz-snapshotter
  golang-github-containerd-stargz-snapshotter-dev
  golang-go
  golang-github-burntsushi-toml-dev
  golang-github-sirupsen-logrus-dev
  golang-google-grpc-dev
  golang-github-containerd-containerd-dev
  fuse3
  docker-registry skopeo iproute2
)

. "$(dirname "${BASH_SOURCE[0]}")/lib/apt-install-missing.sh"
apt_install_missing install-bench-deps "${packages[@]}"
modprobe fuse 2>/dev/null || true
