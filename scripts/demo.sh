#!/usr/bin/env bash
# make demo: Gear as Docker's storage driver, end to end, on this machine only.
#
#   1. start a local registry (127.0.0.1, temp storage)
#   2. start the Gear daemon (graph-driver plugin on a unique unmanaged socket)
#   3. start a private dockerd using it (-s gear-<hex>; own data root and socket)
#   4. build a busybox image from the host's busybox-static (no public registry)
#   5. push it to the registry, delete it locally, pull it back
#   6. run a container on Gear, write a file, show docker diff
#   7. convert an app image into a Gear image, pull only its index, run it and
#      print how many of its files and bytes were fetched
#   8. show what `docker info` says about the storage driver
#   then the same Gear image on Docker 28 with the containerd image store:
#   - start `gear snapshotter` and a private containerd 2.1 (config version 3)
#     with gear as its proxy snapshotter
#   - start a private dockerd 28 on that containerd, daemon.json
#     {"features": {"containerd-snapshotter": true}, "storage-driver": "gear"}
#   - pull the Gear image (only the index comes down), run it lazily and print
#     how many files were fetched
#
# Docker 28 and containerd 2.1 come from Debian unstable, unpacked into a cache
# folder by scripts/install-unstable.sh (make unstable-deps runs it; make demo and make test call it); runc is Debian 12's.
# Everything lives under one temp dir and is stopped, unmounted and removed on
# exit (also on failure or Ctrl-C). Never touches /var/lib/docker, /run/containerd
# or a default socket. Needs root. Expects `make build` to have run (make demo does).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DOCKER=/usr/bin/docker # the 20.10 client (/usr/local/bin/docker may be a newer one without plugin support)
DOCKERD=/usr/sbin/dockerd
REGISTRY=/usr/bin/docker-registry
UNSTABLE=${GEAR_UNSTABLE_ROOT:-${GEAR_TEST_CACHE:-/var/cache/gear-test}/unstable/root}
DOCKER28=$UNSTABLE/usr/bin/docker
DOCKERD28=$UNSTABLE/usr/sbin/dockerd
CONTAINERD21=$UNSTABLE/usr/bin/containerd

step=0
say() { step=$((step + 1)); printf '\n\033[1m==> %d. %s\033[0m\n' "$step" "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\ndemo: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (dockerd and overlay mounts need it)"
for bin in "$DOCKER" "$DOCKERD" "$REGISTRY" /bin/busybox node; do
  command -v "$bin" >/dev/null || die "missing $bin (run: make deps)"
done
[ -f "$REPO/dist/cli/gear.js" ] || die "dist/cli/gear.js missing (run: make build)"
for bin in "$DOCKER28" "$DOCKERD28" "$CONTAINERD21" "$UNSTABLE/usr/bin/containerd-shim-runc-v2" /usr/sbin/runc; do
  [ -x "$bin" ] || die "missing $bin (Docker 28 / containerd 2.1; run: make unstable-deps)"
done

DIR=$(mktemp -d /tmp/gdemo-XXXXXX)
NAME="gear-demo-$(head -c4 /dev/urandom | od -An -tx1 | tr -d ' \n')"
PLUGIN_SOCK="/run/docker/plugins/$NAME.sock"
SOCK="$DIR/docker.sock"
REG_PID='' GEAR_PID='' DOCKERD_PID='' SNAP_PID='' CTRD_PID='' DOCKERD28_PID=''

# Stops one process we started: SIGTERM, bounded wait, SIGKILL.
stop_pid() {
  local pid=$1 what=$2 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || { info "stopped $what"; return 0; }; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  info "killed $what (did not stop within 30 s)"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  printf '\n\033[1m==> cleanup\033[0m\n'
  stop_pid "$DOCKERD_PID" dockerd
  stop_pid "$DOCKERD28_PID" "dockerd 28"
  stop_pid "$CTRD_PID" "containerd 2.1"
  # dockerd's own containerd and shims run from our exec root, containerd 2.1's shims name its
  # socket under our dir; reap any left behind.
  for p in $(grep -l -- "$DIR" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
    [ "$p" = "$GEAR_PID" ] || [ "$p" = "$SNAP_PID" ] || [ "$p" = "$REG_PID" ] || [ "$p" = "$$" ] || stop_pid "$p" "leftover pid $p"
  done
  # Container roots (their lower layers include gear's miss filesystem) before gear stops.
  for sub in d28 ctrd; do
    awk -v d="$DIR/$sub" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
      awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2- |
      while read -r m; do umount -l "$m" 2>/dev/null && info "unmounted $m"; done
  done
  stop_pid "$SNAP_PID" "gear snapshotter"
  stop_pid "$GEAR_PID" "gear daemon"
  stop_pid "$REG_PID" registry
  # Unmount anything still mounted under our dir, deepest first.
  awk -v d="$DIR" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
    awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2- |
    while read -r m; do umount -l "$m" 2>/dev/null && info "unmounted $m"; done
  rm -f "$PLUGIN_SOCK"
  if [ $rc -ne 0 ]; then
    printf '\ndemo FAILED (exit %d). Last log lines:\n' "$rc"
    for f in "$DIR"/*.log; do [ -f "$f" ] && { echo "--- $f"; tail -n 25 "$f"; }; done
  fi
  rm -rf "$DIR"
  info "removed $DIR"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (bounded) until a command succeeds.
wait_for() {
  local what=$1 tries=$2; shift 2
  for _ in $(seq 1 "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  die "$what did not come up"
}
dk() { "$DOCKER" -H "unix://$SOCK" "$@"; }
export DOCKER_CONFIG="$DIR/client" DOCKER_BUILDKIT=0

say "Start a local registry on 127.0.0.1"
PORT=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
mkdir -p "$DIR/registry"
cat >"$DIR/registry/config.yml" <<YAML
version: 0.1
log: { level: warn, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $DIR/registry/data }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$PORT }
YAML
"$REGISTRY" serve "$DIR/registry/config.yml" >"$DIR/registry.log" 2>&1 &
REG_PID=$!
wait_for registry 40 node -e "fetch('http://127.0.0.1:$PORT/v2/').then(r=>process.exit(r.status===200?0:1),()=>process.exit(1))"
info "registry: http://127.0.0.1:$PORT (pid $REG_PID)"

say "Start the Gear daemon (graph-driver plugin '$NAME')"
mkdir -p /run/docker/plugins "$DIR/gear"
node "$REPO/dist/cli/gear.js" daemon --socket "$PLUGIN_SOCK" --root "$DIR/gear" >"$DIR/gear.log" 2>&1 &
GEAR_PID=$!
wait_for "gear daemon" 60 test -S "$PLUGIN_SOCK"
info "plugin socket: $PLUGIN_SOCK (pid $GEAR_PID), store: $DIR/gear"

say "Start a private dockerd with --storage-driver $NAME"
mkdir -p "$DIR/data" "$DIR/exec"
"$DOCKERD" --experimental -s "$NAME" --data-root "$DIR/data" --exec-root "$DIR/exec" \
  -H "unix://$SOCK" --pidfile "$DIR/dockerd.pid" --bridge=none --iptables=false --ip6tables=false \
  --ip-masq=false >"$DIR/dockerd.log" 2>&1 &
DOCKERD_PID=$!
wait_for dockerd 120 dk version
info "dockerd: unix://$SOCK (pid $DOCKERD_PID)"

say "Build a busybox image from the host's busybox-static (no public registry needed)"
ROOTFS="$DIR/rootfs"
mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var,proc,sys,dev}
chmod 1777 "$ROOTFS/tmp"
cp /bin/busybox "$ROOTFS/bin/busybox"
for applet in $(/bin/busybox --list-full); do
  [ -e "$ROOTFS/$applet" ] || ln -s /bin/busybox "$ROOTFS/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$ROOTFS/etc/passwd"
echo 'root:x:0:' >"$ROOTFS/etc/group"
tar --numeric-owner -C "$ROOTFS" -cf "$DIR/busybox.tar" .
IMAGE="127.0.0.1:$PORT/demo/busybox:latest"
dk import --change 'CMD ["/bin/sh"]' "$DIR/busybox.tar" "$IMAGE" >/dev/null
info "$(dk image ls --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' | head -1)"

say "Push it to the local registry, delete it locally, pull it back (layers go through Gear's ApplyDiff)"
dk push "$IMAGE" | sed 's/^/    /'
dk rmi "$IMAGE" >/dev/null
dk pull "$IMAGE" | sed 's/^/    /'

say "Run a container on Gear"
dk run --name demo "$IMAGE" sh -c 'echo "hello from a container on $(uname -r)"; echo written-in-container > /root/proof; ls -l /root/proof'
info "docker diff demo:"
dk diff demo | sed 's/^/      /'
info "docker inspect (GraphDriver):"
dk inspect -f '{{.GraphDriver.Name}} {{json .GraphDriver.Data}}' demo | sed 's/^/      /'
dk rm demo >/dev/null

say "Make an app image with real data: busybox plus a copy of the host's ${DATA_SRC:=$(ls -d /usr/lib/python3.* 2>/dev/null | head -1)}"
[ -d "$DATA_SRC" ] || DATA_SRC=/usr/share/doc
mkdir -p "$ROOTFS/opt/app"
cp -a "$DATA_SRC/." "$ROOTFS/opt/app/"
tar --numeric-owner -C "$ROOTFS" -cf "$DIR/app.tar" .
APP="127.0.0.1:$PORT/demo/app:latest"
GEAR_APP="127.0.0.1:$PORT/demo/app:gear"
dk import --change 'CMD ["/bin/sh"]' "$DIR/app.tar" "$APP" >/dev/null
info "$(dk image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$APP")  ($(find "$ROOTFS" -type f | wc -l) files)"

say "Convert it into a Gear image: a small index layer + each distinct file once, in the registry"
node "$REPO/dist/cli/gear.js" convert --docker-host "unix://$SOCK" --no-progress --json \
  "docker-daemon:$APP" "$GEAR_APP" >"$DIR/convert.json" 2>"$DIR/convert.log" || { cat "$DIR/convert.log"; die "gear convert failed"; }
node -e '
  const s = require(process.argv[1]);
  const mb = (n) => (n / 1e6).toFixed(1) + " MB";
  console.log(`    ${s.files} files (${s.uniqueContents} distinct contents, ${mb(s.logicalBytes)}), uploaded ${mb(s.bytesUploaded)}, index layer ${(s.indexSize / 1024).toFixed(0)} KiB, ${s.seconds.toFixed(1)} s`);
' "$DIR/convert.json"

say "Remove every local copy, then pull the Gear image: only the index comes down"
dk rmi "$APP" >/dev/null
dk pull "$GEAR_APP" | sed 's/^/    /'

fetched() { dk info 2>/dev/null | awk -F': ' -v k="$1" '$1 ~ "^ *"k"$" { print $2 }'; }
# Read-ahead (format v3: a miss brings its pack neighbours along) may still be landing when a container
# exits: wait until the count holds still for half a second (at most 15 s) before reading it.
settle() {
  local prev='' now i
  for i in $(seq 1 30); do
    now=$(fetched 'Fetched Files')
    [ "$now" = "$prev" ] && return 0
    prev=$now
    sleep 0.5
  done
}
files0=$(fetched 'Fetched Files'); bytes0=$(fetched 'Fetched Bytes')
say "Run it: the container starts at once; files are fetched the first time something opens them"
dk run --rm "$GEAR_APP" sh -c 'ls /opt/app | wc -l | sed "s/^/files at top level: /"; head -c 200 /opt/app/$(ls /opt/app | grep "\.py$" | head -1) | head -3'
settle
files1=$(fetched 'Fetched Files'); bytes1=$(fetched 'Fetched Bytes')
node -e '
  const s = require(process.argv[1]);
  const [f, b] = [Number(process.argv[2]), Number(process.argv[3])];
  const pct = (a, t) => (100 * a / t).toFixed(2) + "%";
  console.log(`    fetched ${f} of ${s.files} files (${pct(f, s.files)}), ${(b / 1e3).toFixed(1)} kB of ${(s.logicalBytes / 1e6).toFixed(1)} MB (${pct(b, s.logicalBytes)})`);
' "$DIR/convert.json" "$((files1 - files0))" "$((bytes1 - bytes0))"
info "run it again: the file now comes from the node's shared cache (no fetch)"
dk run --rm "$GEAR_APP" sh -c 'head -c 200 /opt/app/$(ls /opt/app | grep "\.py$" | head -1) >/dev/null'
settle
info "fetched since: $(( $(fetched 'Fetched Files') - files1 )) files"

say "What docker info says about the storage driver"
dk info 2>/dev/null | sed -n '/Storage Driver:/,/Logging Driver:/p' | grep -v 'Logging Driver' | sed 's/^/    /'


# ---------------------------------------------------------------- Docker 28, containerd image store

say "Docker 28 with the containerd image store: start gear snapshotter and a private containerd $("$CONTAINERD21" --version | awk '{print $3}')"
SNAP_ROOT="$DIR/snap" SNAP_SOCK="$DIR/snap.sock" CTRD="$DIR/ctrd"
mkdir -p "$SNAP_ROOT" "$CTRD/root" "$CTRD/state"
node "$REPO/dist/cli/gear.js" snapshotter --root "$SNAP_ROOT" --socket "$SNAP_SOCK" >"$DIR/snapshotter.log" 2>&1 &
SNAP_PID=$!
wait_for "gear snapshotter" 60 test -S "$SNAP_SOCK"
info "gear snapshotter: $SNAP_SOCK (pid $SNAP_PID), store: $SNAP_ROOT"
# containerd 2.x config (version 3): gear as the proxy snapshotter "gear". The CRI plugins and NRI
# are off here only because this containerd is private (NRI would listen on /var/run/nri).
cat >"$CTRD/config.toml" <<TOML
version = 3
root = "$CTRD/root"
state = "$CTRD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]

[grpc]
  address = "$CTRD/containerd.sock"

[ttrpc]
  address = "$CTRD/containerd.sock.ttrpc"

[proxy_plugins]
  [proxy_plugins.gear]
    type = "snapshot"
    address = "$SNAP_SOCK"
TOML
# PATH: containerd starts containerd-shim-runc-v2 from its own folder, the shim runs Debian 12's
# runc (/usr/sbin); dockerd finds docker-init (tini) in /usr/bin.
PATH28="$UNSTABLE/usr/bin:$UNSTABLE/usr/sbin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PATH="$PATH28" "$CONTAINERD21" --config "$CTRD/config.toml" >"$DIR/containerd.log" 2>&1 &
CTRD_PID=$!
wait_for "containerd 2.1" 120 "$UNSTABLE/usr/bin/ctr" --address "$CTRD/containerd.sock" version
"$UNSTABLE/usr/bin/ctr" --address "$CTRD/containerd.sock" plugins ls | awk '$2 == "gear" { print "    containerd plugin: " $1 " " $2 " " $4 }'

say "Start a private dockerd $("$DOCKERD28" --version | awk '{print $3}' | tr -d ,) on it with \"storage-driver\": \"gear\""
D28="$DIR/d28" SOCK28="$DIR/d28.sock"
mkdir -p "$D28/data" "$D28/exec"
cat >"$D28/daemon.json" <<JSON
{
  "features": { "containerd-snapshotter": true },
  "storage-driver": "gear"
}
JSON
sed 's/^/    /' "$D28/daemon.json"
PATH="$PATH28" "$DOCKERD28" --config-file "$D28/daemon.json" --containerd "$CTRD/containerd.sock" \
  --data-root "$D28/data" --exec-root "$D28/exec" -H "unix://$SOCK28" --pidfile "$D28/dockerd.pid" \
  --bridge=none --iptables=false --ip6tables=false --ip-masq=false --userland-proxy=false >"$DIR/dockerd28.log" 2>&1 &
DOCKERD28_PID=$!
d28() { DOCKER_CONFIG="$DIR/client28" "$DOCKER28" -H "unix://$SOCK28" "$@"; }
wait_for "dockerd 28" 120 d28 version
info "dockerd 28: unix://$SOCK28 (pid $DOCKERD28_PID)"
d28 info 2>/dev/null | sed -n '/Storage Driver:/,/driver-type/p' | sed 's/^/    /'

say "Pull the Gear image with Docker 28: only the config and the index come down"
d28 pull "$GEAR_APP" | sed 's/^/    /'
info "$(d28 image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$GEAR_APP")"

pool_files() { find "$SNAP_ROOT/pool/sha256" -type f 2>/dev/null | wc -l; }
pool_bytes() { find "$SNAP_ROOT/pool/sha256" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }
say "Run it on Docker 28: files are fetched into gear's pool the first time something opens them"
d28 run --rm "$GEAR_APP" sh -c 'ls /opt/app | wc -l | sed "s/^/files at top level: /"; head -c 200 /opt/app/$(ls /opt/app | grep "\.py$" | head -1) | head -3'
node -e '
  const s = require(process.argv[1]);
  const [f, b] = [Number(process.argv[2]), Number(process.argv[3])];
  const pct = (a, t) => (100 * a / t).toFixed(2) + "%";
  console.log(`    fetched ${f} of ${s.files} files (${pct(f, s.files)}), ${(b / 1e3).toFixed(1)} kB of ${(s.logicalBytes / 1e6).toFixed(1)} MB (${pct(b, s.logicalBytes)})`);
' "$DIR/convert.json" "$(pool_files)" "$(pool_bytes)"
info "docker inspect (GraphDriver of a container on the containerd image store):"
d28 create --name demo28 "$GEAR_APP" true >/dev/null
d28 inspect -f '{{.GraphDriver.Name}}' demo28 | sed 's/^/      /'
d28 rm demo28 >/dev/null

printf '\n\033[1mDemo finished: dockerd ran containers on the Gear storage driver, and a Gear image lazily, on Docker 20.10 (graph-driver plugin) and on Docker 28 (containerd image store).\033[0m\n'
