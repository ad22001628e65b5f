#!/usr/bin/env bash
# Builds bench/estargz/main.go (gear-stargz-grpc, the eStargz snapshotter daemon
# of `make bench`) in GOPATH mode against Debian 12's Go 1.19 and the -dev
# packages of scripts/install-bench-deps.sh. No module download: every import
# resolves under /usr/share/gocode.
#
#   bash bench/estargz/build.sh [OUT]     (default build/bench/gear-stargz-grpc)
#
# Rebuilds only when main.go is newer than OUT.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/build/bench/gear-stargz-grpc}"
if [ -x "$out" ] && [ "$out" -nt "$here/main.go" ]; then
  exit 0
fi
if [ ! -d /usr/share/gocode/src/github.com/containerd/stargz-snapshotter/fs ]; then
  echo "bench: the stargz snapshotter library is missing: run bash scripts/install-bench-deps.sh" >&2
  exit 1
fi
command -v go >/dev/null || { echo "bench: no go toolchain: run bash scripts/install-bench-deps.sh" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
gopath="$(mktemp -d /tmp/gear-stargz-gopath.XXXXXX)"
trap 'rm -rf "$gopath"' EXIT
# A private GOPATH entry first (build cache and any output land there), Debian's
# packaged sources second.
export GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="${GOCACHE:-$repo/build/bench/go-cache}" GOFLAGS=-mod=
cd "$here"
go build -trimpath -o "$out.tmp" .
mv "$out.tmp" "$out"
echo "bench: built $out ($(go version))"
