#!/usr/bin/env bash
# Fetches newer runtimes from Debian's *unstable* suite into a cache folder, without
# touching the system's packages: `apt-get download` against a sources list of its own
# (same mirror as the system's), then `dpkg -x` of each .deb into one tree.
#
#   scripts/install-unstable.sh            # the default set, prints the tree's path
#   GEAR_UNSTABLE_DIR=/some/dir scripts/install-unstable.sh pkg1 pkg2 …
#
# The default set: docker.io + docker-cli 28.5 (dockerd 28 with the containerd image store),
# containerd 2.1 (containerd, ctr, containerd-shim-runc-v2), the containerd 2.1 Go sources
# (snapshots/testsuite) and the CRI api.proto (golang-k8s-cri-api-dev). dockerd, containerd and
# the shim run on Debian 12's glibc; runc from unstable does not, so tests use Debian 12's runc.
# For containerd 2.1's snapshotter conformance suite (test/conformance2, built offline in GOPATH
# mode): unstable's Go (golang-1.27-go + its -src; it runs from root/usr/lib/go-1.27 with GOROOT
# set) and the -dev packages of the suite's import closure (containerd's own package does not
# pull in its dependencies when unpacked with dpkg -x).
#
# The tree is $GEAR_UNSTABLE_DIR/root (default /var/cache/gear-test/unstable/root), e.g.
# root/usr/bin/containerd, root/usr/sbin/dockerd, root/usr/share/gocode/src/…
# A stamp file per package (root/.stamps/<name>=<version>) makes a rerun fetch nothing.
set -euo pipefail

dir=${GEAR_UNSTABLE_DIR:-${GEAR_TEST_CACHE:-/var/cache/gear-test}/unstable}
default=(docker.io docker-cli containerd golang-github-containerd-containerd-dev golang-k8s-cri-api-dev
  golang-go-toolchain
  golang-github-containerd-containerd-api-dev golang-github-containerd-continuity-dev
  golang-github-containerd-errdefs-dev golang-github-containerd-log-dev golang-github-containerd-ttrpc-dev
  golang-github-containerd-typeurl-dev golang-github-davecgh-go-spew-dev golang-github-gogo-protobuf-dev
  golang-github-golang-protobuf-1-5-dev golang-github-google-go-cmp-dev golang-github-moby-sys-dev
  golang-github-opencontainers-go-digest-dev golang-github-opencontainers-image-spec-dev
  golang-github-pmezard-go-difflib-dev golang-github-sirupsen-logrus-dev golang-github-stretchr-testify-dev
  golang-golang-x-net-dev golang-golang-x-sync-dev golang-golang-x-sys-dev golang-golang-x-text-dev
  golang-google-genproto-dev golang-google-grpc-dev golang-google-protobuf-dev golang-gopkg-yaml.v3-dev)
if (($#)); then pkgs=("$@"); else pkgs=("${default[@]}"); fi

# The mirror the system already uses (first deb.debian.org-like URI of its sources), else Debian's.
mirror=$(grep -hoE '^(URIs:|deb) *\[?[^]]*\]? *https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | grep -oE 'https?://[^ ]+/debian/?' | head -1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

mkdir -p "$dir/etc" "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/debs" "$dir/root/.stamps"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} unstable main" >"$dir/etc/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$dir/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
  -o Debug::NoLocking=1 -o APT::Sandbox::User=root
)

# Refresh the suite's package list when it is missing or older than a day.
lists=("$dir"/lists/*_Packages*)
if [ ! -e "${lists[0]}" ] || [ -n "$(find "$dir/lists" -maxdepth 1 -name '*_Packages*' -mmin +1440 -print -quit)" ]; then
  echo "install-unstable: updating the unstable package list from $mirror" >&2
  apt-get "${apt_opts[@]}" update -qq >&2
fi

# golang-go-toolchain stands for the versioned toolchain unstable's golang-go depends on now
# (golang-1.N-go and golang-1.N-src): a hard-coded 1.N would vanish when unstable moves on.
resolved=()
for p in "${pkgs[@]}"; do
  if [ "$p" = golang-go-toolchain ]; then
    go=$(apt-cache "${apt_opts[@]}" show --no-all-versions golang-go 2>/dev/null | awk '/^Depends:/ && g == "" {if (match($0, /golang-1\.[0-9]+-go/)) g = substr($0, RSTART, RLENGTH)} END {print g}')
    if [ -z "$go" ]; then
      echo "install-unstable: cannot tell which Go toolchain unstable's golang-go depends on" >&2
      exit 1
    fi
    resolved+=("$go" "${go%-go}-src")
  else
    resolved+=("$p")
  fi
done

for p in "${resolved[@]}"; do
  # awk reads to the end: an early exit would SIGPIPE apt-cache, which pipefail turns into an abort.
  version=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$p" 2>/dev/null | awk '/^Version:/ && v == "" {v = $2} END {print v}')
  if [ -z "$version" ]; then
    echo "install-unstable: $p is not in Debian unstable at $mirror" >&2
    exit 1
  fi
  stamp="$dir/root/.stamps/$p=$version"
  [ -e "$stamp" ] && continue
  echo "install-unstable: fetching $p $version" >&2
  tmp=$(mktemp -d "$dir/debs/.dl.XXXXXX")
  (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "$p=$version" >&2)
  deb=("$tmp"/*.deb)
  dpkg -x "${deb[0]}" "$dir/root"
  mv -f "${deb[0]}" "$dir/debs/"
  rm -rf "$tmp"
  rm -f "$dir/root/.stamps/$p="*
  touch "$stamp"
done

echo "$dir/root"
