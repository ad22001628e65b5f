#!/usr/bin/env bash
# Builds the managed Docker plugin bundle (config.json + rootfs/) from this
# machine's own binaries -- no base image is pulled -- and, unless --no-create,
# runs `docker plugin create NAME BUNDLE`.
#
#   plugin/build.sh [--no-create] [--out DIR] [--name NAME]
#
# Environment: DOCKER (client binary, default docker), DOCKER_HOST (daemon the
# plugin is created on; default the client's own), PLUGIN_NAME (default
# gear:<package.json version>), OUT (bundle dir, default plugin/.bundle).
#
# rootfs layout:
#   /usr/local/bin/node           the host's node binary (+ every library ldd lists, + the loader)
#   /bin/mount, /bin/umount       util-linux (the daemon spawns `mount -i -t fuse.gear` with an fd,
#                                 and overlay mounts with data-only lowers `::`), + their libraries
#   /bin/busybox + applet links   sh, stat (the daemon probes stale FUSE mounts with `stat -c %i`), ls, cat...
#   /opt/gear/                    package.json, dist/, build/Release/gear_native.node, production node_modules
#   /etc/passwd, /etc/group       root only (HOME=/root: registry credentials in /root/.docker/config.json)
#   /tmp /run/docker/plugins /var/lib/gear /root  empty mount points / scratch (/root: the host's
#                                 home, mount "home", so enable needs no /root/.docker on the host)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
version="$(node -p "require('$repo/package.json').version")"

create=1
OUT="${OUT:-$here/.bundle}"
PLUGIN_NAME="${PLUGIN_NAME:-gear:$version}"
DOCKER="${DOCKER:-docker}"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-create) create=0 ;;
    --out) OUT="$2"; shift ;;
    --name) PLUGIN_NAME="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "[plugin/build.sh] $*" >&2; }
die() { echo "[plugin/build.sh] error: $*" >&2; exit 1; }

# ---- inputs ------------------------------------------------------------------
NODE_BIN="$(readlink -f "$(command -v node)")"
MOUNT_BIN="$(readlink -f "$(command -v mount)")"
UMOUNT_BIN="$(readlink -f "$(command -v umount)")"
BUSYBOX_BIN=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && file -L "$b" | grep -q 'statically linked'; then BUSYBOX_BIN="$b"; break; fi
done
[ -n "$BUSYBOX_BIN" ] || die "a static busybox is needed (apt-get install busybox-static)"
"$MOUNT_BIN" --version 2>/dev/null | grep -q util-linux || die "$MOUNT_BIN is not util-linux mount"
[ -f "$repo/dist/cli/gear.js" ] || die "dist/ is missing: run 'make build' first"
[ -f "$repo/build/Release/gear_native.node" ] || die "build/Release/gear_native.node is missing: run 'make build' first"
[ -f "$repo/config.json" ] || die "config.json is missing at the top of the repository"

# ---- fresh bundle ---------------------------------------------------------------
case "$OUT" in /|"") die "refusing OUT=$OUT" ;; esac
rm -rf "$OUT"
rootfs="$OUT/rootfs"
mkdir -p "$rootfs"/{bin,sbin,etc,lib64,tmp,root,usr/bin,usr/local/bin,opt/gear,run/docker/plugins,run/mount,var/lib/gear,dev,proc,sys}
chmod 1777 "$rootfs/tmp"

# Copies a file to the same path inside rootfs (following symlinks).
put() {
  local src="$1" dst="$rootfs${2:-$1}"
  mkdir -p "$(dirname "$dst")"
  cp -L --preserve=mode "$src" "$dst"
}

# Copies every shared library (and the dynamic loader) a binary needs, at the path ldd resolves.
put_libs() {
  local lib
  while read -r lib; do
    [ -n "$lib" ] || continue
    [ -e "$rootfs$lib" ] || put "$lib"
  done < <(ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

say "node $("$NODE_BIN" --version) from $NODE_BIN"
put "$NODE_BIN" /usr/local/bin/node
put_libs "$NODE_BIN"
# Debian's node carries debug info (~12 MB); the plugin does not need it.
if command -v strip >/dev/null; then strip --strip-unneeded "$rootfs/usr/local/bin/node"; fi

say "util-linux mount/umount from $MOUNT_BIN, $UMOUNT_BIN"
put "$MOUNT_BIN" /bin/mount
put "$UMOUNT_BIN" /bin/umount
put_libs "$MOUNT_BIN"
put_libs "$UMOUNT_BIN"

say "busybox from $BUSYBOX_BIN"
put "$BUSYBOX_BIN" /bin/busybox
ln -s ../../bin/busybox "$rootfs/usr/bin/env"
for applet in sh ash cat ls ln mkdir rm rmdir mv cp stat grep sed head tail ps kill sleep df du find \
  id true false echo printf test [ uname wc sort xargs mountpoint nsenter; do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done

# ---- the app ------------------------------------------------------------------
app="$rootfs/opt/gear"
say "app into /opt/gear"
cp "$repo/package.json" "$repo/package-lock.json" "$app/"
cp -a "$repo/dist" "$app/dist"
find "$app/dist" -name '*.map' -delete
mkdir -p "$app/build/Release"
cp "$repo/build/Release/gear_native.node" "$app/build/Release/"
put_libs "$repo/build/Release/gear_native.node"
# Production dependencies only: a copy of the installed tree pruned offline
# (no registry access, no install scripts: the native addon is already built).
[ -d "$repo/node_modules" ] || die "node_modules is missing: run 'make build' first"
cp -a "$repo/node_modules" "$app/node_modules"
(cd "$app" && npm prune --omit=dev --ignore-scripts --offline --no-audit --no-fund --loglevel=error >/dev/null 2>&1) \
  || die "npm prune --omit=dev failed"
rm -f "$app/package-lock.json"
rm -rf "$app/node_modules/.bin" "$app/node_modules/@types" "$app/node_modules/node-addon-api" "$app/node_modules/.package-lock.json"
# Type declarations, source maps and docs are not needed at run time (licences stay).
find "$app/node_modules" -type f \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \
  -o \( -name '*.md' ! -iname 'LICENSE*' \) \) -delete
find "$app/node_modules" -type d -empty -delete

# ---- /etc -----------------------------------------------------------------------
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
: >"$rootfs/etc/fstab"
# The host's CA bundle, added to node's built-in roots through NODE_EXTRA_CA_CERTS (config.json).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then put /etc/ssl/certs/ca-certificates.crt; fi
: >"$rootfs/etc/hosts"        # replaced by dockerd's bind mount (Network.Type host)
: >"$rootfs/etc/resolv.conf"  # idem

cp "$repo/config.json" "$OUT/config.json"
# The name it is created under: keeps two creates of one build (e.g. gear and REG/gear:tag)
# from colliding in dockerd's content store ("content ... already exists").
printf '%s\n' "$PLUGIN_NAME" >"$rootfs/etc/gear-plugin-ref"

# ---- smoke test in the rootfs (chroot, no mounts needed) ---------------------------------
if [ "$(id -u)" = 0 ]; then
  chroot "$rootfs" /usr/bin/env -i /usr/local/bin/node /opt/gear/dist/cli/gear.js daemon --help >/dev/null \
    || die "node cannot run the daemon inside the rootfs (missing library?)"
  chroot "$rootfs" /bin/mount --version >/dev/null || die "mount cannot run inside the rootfs"
  chroot "$rootfs" /usr/bin/env -i /usr/local/bin/node -e "require('/opt/gear/build/Release/gear_native.node')" \
    || die "the native addon cannot load inside the rootfs"
fi

size="$(du -sh --apparent-size "$rootfs" | cut -f1)"
say "bundle $OUT (rootfs $size)"

# ---- docker plugin create ------------------------------------------------------------
if [ "$create" = 1 ]; then
  say "docker plugin create $PLUGIN_NAME${DOCKER_HOST:+ on $DOCKER_HOST}"
  "$DOCKER" plugin create "$PLUGIN_NAME" "$OUT"
fi
