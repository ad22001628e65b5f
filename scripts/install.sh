#!/usr/bin/env bash
# Installs (or, with --uninstall, removes) a self-contained gear on this host: what `make install` and
# `make uninstall` run. It installs what `make build` made; it builds nothing and fetches nothing.
#
#   scripts/install.sh [--uninstall]
#
# Variables (environment; the Makefile passes its own):
#   PREFIX            /usr/local
#   DESTDIR           staging root for packagers: files go to $DESTDIR$PREFIX/..., while the paths written
#                     into the launcher and the units are the final ones ($PREFIX/...)
#   BINDIR            $PREFIX/bin                 the `gear` launcher
#   LIBDIR            $PREFIX/lib                 gear itself in $LIBDIR/gear
#   SYSCONFDIR        /etc when PREFIX is /usr or /usr/local, else $PREFIX/etc
#   SYSTEMD_UNIT_DIR  $PREFIX/lib/systemd/system  (systemd searches /usr/local/lib/systemd/system and
#                     /usr/lib/systemd/system; for another PREFIX use /etc/systemd/system)
#   NODE              the node binary the launcher and units run (default: `command -v node`)
#
# Installed:
#   $BINDIR/gear                                 launcher: exec $NODE $LIBDIR/gear/gear.mjs "$@"
#   $LIBDIR/gear/                                package.json, gear.mjs, dist/, proto/,
#                                                build/Release/gear_native.node, production node_modules/,
#                                                libexec/wait-socket.cjs, share/ (pristine config copies),
#                                                install-manifest (what uninstall removes)
#   $SYSTEMD_UNIT_DIR/gear-snapshotter.service, gear-daemon.service
#   $SYSCONFDIR/default/gear                     settings (kept if it exists: never overwritten)
#   $SYSCONFDIR/containerd/conf.d/gear.toml      containerd drop-in (kept if it exists)
#
# Uninstall removes everything in the manifest; a config file that was edited since is kept (and named).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

say() { echo "[install] $*" >&2; }
die() { echo "[install] error: $*" >&2; exit 1; }

mode=install
case "${1:-}" in
  "") ;;
  --uninstall) mode=uninstall ;;
  -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
  *) die "unknown argument $1 (scripts/install.sh [--uninstall])" ;;
esac

PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX%/}"
[ -n "$PREFIX" ] || PREFIX=/
case "$PREFIX" in /*) ;; *) die "PREFIX must be an absolute path (got '$PREFIX')" ;; esac
BINDIR="${BINDIR:-$PREFIX/bin}"
LIBDIR="${LIBDIR:-$PREFIX/lib}"
if [ -z "${SYSCONFDIR:-}" ]; then
  case "$PREFIX" in /usr|/usr/local) SYSCONFDIR=/etc ;; *) SYSCONFDIR="$PREFIX/etc" ;; esac
fi
SYSTEMD_UNIT_DIR="${SYSTEMD_UNIT_DIR:-$PREFIX/lib/systemd/system}"
PKGLIBDIR="$LIBDIR/gear"
for v in BINDIR LIBDIR SYSCONFDIR SYSTEMD_UNIT_DIR; do
  case "${!v}" in /*) ;; *) die "$v must be an absolute path (got '${!v}')" ;; esac
done
# Final paths (written into files) vs where files go now.
d() { printf '%s%s' "$DESTDIR" "$1"; }
manifest="$(d "$PKGLIBDIR")/install-manifest"

# ---------------------------------------------------------------------------------------------------
if [ "$mode" = uninstall ]; then
  [ -f "$manifest" ] || die "$manifest not found: nothing installed under PREFIX=$PREFIX${DESTDIR:+ DESTDIR=$DESTDIR} (pass the PREFIX, DESTDIR and SYSCONFDIR of the install)"
  kept=()
  while IFS=$'\t' read -r kind path pristine; do
    [ -n "$path" ] || continue
    case "$path" in /*) ;; *) die "corrupt manifest line: $kind $path" ;; esac
    case "$path" in *..*) die "corrupt manifest line: $kind $path" ;; esac
    # Only files this script installs, whatever else the manifest may say.
    case "$kind:$path" in
      file:*/gear | file:*/gear-snapshotter.service | file:*/gear-daemon.service) ;;
      config:*/default/gear | config:*/containerd/conf.d/gear.toml) ;;
      file:* | config:*) die "manifest names a file this script does not install: $path" ;;
    esac
    case "$kind" in
      file)
        rm -f "$(d "$path")"
        ;;
      config)
        if [ -e "$(d "$path")" ] && ! cmp -s "$(d "$path")" "$(d "$pristine")"; then
          kept+=("$(d "$path")")
        else
          rm -f "$(d "$path")"
        fi
        ;;
      tree|dir)
        ;; # removed last: the pristine copies of config files live in it
      *) die "corrupt manifest line: $kind $path" ;;
    esac
  done <"$manifest"
  mapfile -t created < <(awk -F'\t' '$1 == "dir" {print $2}' "$manifest" | sort -r)
  # The package directory, wholly ours (the manifest with it).
  rm -rf "$(d "$PKGLIBDIR")"
  # Directories this script created (recorded at install), deepest first, if empty now.
  for dir in "${created[@]}"; do
    rmdir "$(d "$dir")" 2>/dev/null || true
  done
  for f in "${kept[@]}"; do say "kept $f: it was edited since the install (remove it by hand if unwanted)"; done
  say "removed gear from PREFIX=$PREFIX${DESTDIR:+ (DESTDIR=$DESTDIR)}"
  if [ -z "$DESTDIR" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    say "run 'systemctl daemon-reload' (and remove the containerd imports line if you added one)"
  fi
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Inputs: what `make build` made.
[ -f "$repo/dist/cli/gear.js" ] || die "dist/ is missing: run 'make build' first (as your user; install only copies)"
[ -f "$repo/build/Release/gear_native.node" ] || die "build/Release/gear_native.node is missing: run 'make build' first"
[ -d "$repo/node_modules/commander" ] || die "node_modules is missing: run 'make build' first"
for pair in "src:dist/cli/gear.js" "native:build/Release/gear_native.node"; do
  if stale="$(find "$repo/${pair%%:*}" -newer "$repo/${pair#*:}" -type f -print -quit)" && [ -n "$stale" ]; then
    say "warning: $stale is newer than ${pair#*:}: installing the last build (run 'make build' to include the change)"
  fi
done
# The node that runs this script's helpers (reading package-lock.json): the PATH's.
NODE_FOR_BUILD="$(command -v node || true)"
[ -n "$NODE_FOR_BUILD" ] || die "node is not on PATH: install Node.js >= 20.18.1 (make build needs it too)"
if [ -z "${NODE:-}" ]; then
  NODE="$(command -v node || true)"
  [ -n "$NODE" ] || die "node is not on PATH: install Node.js >= 20.18.1 or pass NODE=/path/to/node"
  # Kept as found (not resolved): a symlink such as /usr/local/bin/node that a Node.js upgrade moves
  # stays valid.
fi
case "$NODE" in /*) ;; *) die "NODE must be an absolute path (got '$NODE')" ;; esac
if [ -x "$NODE" ]; then
  "$NODE" -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=18)?0:1)' \
    || die "$NODE is Node.js $("$NODE" --version); Gear needs >= 20.18.1 (pass NODE=/path/to/node)"
elif [ -z "$DESTDIR" ]; then
  die "NODE=$NODE is not an executable"
else
  say "warning: NODE=$NODE does not exist here; the launcher and units will run it on the target system"
fi

# Refuse to install over something that is not ours.
if [ -e "$(d "$PKGLIBDIR")" ] && [ ! -f "$manifest" ]; then
  die "$(d "$PKGLIBDIR") exists and was not installed by this script; remove it or choose another PREFIX"
fi

# Directories this install creates (and an earlier one did), for uninstall: never one that was there.
created=()
if [ -f "$manifest" ]; then
  while IFS= read -r dir; do created+=("$dir"); done < <(awk -F'\t' '$1 == "dir" {print $2}' "$manifest")
fi
for dir in "$BINDIR" "$LIBDIR" "$SYSTEMD_UNIT_DIR" "$SYSCONFDIR/default" "$SYSCONFDIR/containerd/conf.d"; do
  while [ "$dir" != / ] && [ ! -e "$(d "$dir")" ]; do
    created+=("$dir")
    dir="$(dirname "$dir")"
  done
done

# The package tree is staged beside its final place, then swapped in with a rename: an interrupted
# install leaves the previous tree (or none), never half of one.
mkdir -p "$(d "$LIBDIR")" 2>/dev/null && [ -w "$(d "$LIBDIR")" ] \
  || die "cannot write $(d "$LIBDIR"): run as root (sudo make install), or choose PREFIX= (and SYSTEMD_UNIT_DIR=, SYSCONFDIR=) you can write"
# What an install killed midway left (its staging tree, or the previous tree being swapped out).
for left in "$(d "$LIBDIR")"/.gear-install.* "$(d "$LIBDIR")"/.gear-old.*; do
  [ -e "$left" ] || continue
  if [ ! -e "$(d "$PKGLIBDIR")" ] && [ -f "$left/install-manifest" ] && [ "${left#*/.gear-old.}" != "$left" ]; then
    mv "$left" "$(d "$PKGLIBDIR")" # killed between the two renames: put the previous tree back
  else
    rm -rf "$left"
  fi
done
stage="$(mktemp -d "$(d "$LIBDIR")/.gear-install.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
trap 'exit 130' INT TERM HUP

say "gear into $(d "$PKGLIBDIR")"
cp "$repo/package.json" "$repo/package-lock.json" "$stage/"
cp -a "$repo/dist" "$stage/dist"
find "$stage/dist" -name '*.map' -delete
cp -a "$repo/proto" "$stage/proto"
mkdir -p "$stage/build/Release" "$stage/libexec" "$stage/share"
cp "$repo/build/Release/gear_native.node" "$stage/build/Release/"
cp "$repo/packaging/launcher/gear.mjs" "$stage/gear.mjs"
cp "$repo/packaging/launcher/wait-socket.cjs" "$stage/libexec/wait-socket.cjs"

# Production dependencies only: the packages package-lock.json does not mark "dev", copied from the
# built tree (what `npm ci --omit=dev` would install, without registry access or install scripts: the
# native addon is built already and copied above).
say "production node_modules (package-lock.json without dev packages)"
"$NODE_FOR_BUILD" -e '
  const lock = require(process.argv[1]);
  for (const [p, m] of Object.entries(lock.packages ?? {})) {
    if (!p.startsWith("node_modules/") || m.dev || m.link) continue;
    if (p.slice("node_modules/".length).includes("/node_modules/")) continue; // copied with its parent
    console.log(p);
  }' "$repo/package-lock.json" >"$stage/.prod-packages"
[ -s "$stage/.prod-packages" ] || die "no production packages found in package-lock.json"
(cd "$repo" && while IFS= read -r p; do
  if [ -d "$p" ]; then printf '%s\0' "$p"; else echo "$p" >&3; fi
done <"$stage/.prod-packages" 3>"$stage/.missing" | xargs -0 -r cp -a --parents -t "$stage")
# Optional packages for other platforms are never installed; anything else missing is an error.
while IFS= read -r p; do
  "$NODE_FOR_BUILD" -e 'process.exit(require(process.argv[1]).packages[process.argv[2]]?.optional ? 0 : 1)' \
    "$repo/package-lock.json" "$p" || die "$p is missing from node_modules: run 'make build' (npm ci) first"
done <"$stage/.missing"
rm -f "$stage/.prod-packages" "$stage/.missing"
rm -f "$stage/package-lock.json"
# Build-time only (node-addon-api: headers of the addon) or not needed at run time.
rm -rf "$stage/node_modules/.bin" "$stage/node_modules/@types" "$stage/node_modules/node-addon-api" \
  "$stage/node_modules/.package-lock.json"
find "$stage/node_modules" -type f \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \) -delete
find "$stage/node_modules" -type d -empty -delete
# Nothing in the tree may point back into the checkout.
if escaped="$(find "$stage" -type l -lname '/*' -print -quit)" && [ -n "$escaped" ]; then
  die "absolute symlink in the installed tree: $escaped -> $(readlink "$escaped")"
fi

subst() { # template -> output, with the final paths
  sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@PKGLIBDIR@|$PKGLIBDIR|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" \
    -e "s|@NODE@|$NODE|g" -e "s|@PREFIX@|$PREFIX|g" "$1" >"$2"
  if grep -q '@[A-Z]*@' "$2"; then die "unsubstituted token in $2: $(grep -o '@[A-Z]*@' "$2" | head -1)"; fi
}
# Pristine copies of the config files: uninstall removes an installed one only if it still matches.
cp "$repo/packaging/default/gear" "$stage/share/default-gear"
subst "$repo/packaging/containerd/gear.toml.in" "$stage/share/containerd-gear.toml"

{
  printf 'tree\t%s\n' "$PKGLIBDIR"
  printf 'file\t%s\n' "$BINDIR/gear" "$SYSTEMD_UNIT_DIR/gear-snapshotter.service" "$SYSTEMD_UNIT_DIR/gear-daemon.service"
  printf 'config\t%s\t%s\n' "$SYSCONFDIR/default/gear" "$PKGLIBDIR/share/default-gear"
  printf 'config\t%s\t%s\n' "$SYSCONFDIR/containerd/conf.d/gear.toml" "$PKGLIBDIR/share/containerd-gear.toml"
  if ((${#created[@]})); then printf 'dir\t%s\n' "${created[@]}" | sort -u; fi
} >"$stage/install-manifest"
# Root runs this code: as root, nothing in it may stay owned by the checkout's user (cp -a kept
# its owner), and nothing is writable by group or others.
if [ "$(id -u)" = 0 ]; then chown -R 0:0 "$stage"; fi
chmod -R u+rwX,go+rX,go-w "$stage"

# Swap the tree in.
if [ -e "$(d "$PKGLIBDIR")" ]; then
  old="$(d "$LIBDIR")/.gear-old.$$"
  mv "$(d "$PKGLIBDIR")" "$old"
  mv "$stage" "$(d "$PKGLIBDIR")"
  rm -rf "$old"
else
  mv "$stage" "$(d "$PKGLIBDIR")"
fi
trap - EXIT

# Launcher and units: written to a temp name, then renamed.
put() { # template dest mode
  local dest
  dest="$(d "$2")"
  mkdir -p "$(dirname "$dest")"
  subst "$1" "$dest.tmp.$$"
  chmod "$3" "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
}
say "launcher $(d "$BINDIR/gear") (node: $NODE)"
put "$repo/packaging/launcher/gear.sh.in" "$BINDIR/gear" 0755
say "systemd units into $(d "$SYSTEMD_UNIT_DIR")"
put "$repo/packaging/systemd/gear-snapshotter.service.in" "$SYSTEMD_UNIT_DIR/gear-snapshotter.service" 0644
put "$repo/packaging/systemd/gear-daemon.service.in" "$SYSTEMD_UNIT_DIR/gear-daemon.service" 0644

# Config files: never overwrite the admin's.
config() { # pristine dest
  local dest
  dest="$(d "$2")"
  if [ -e "$dest" ]; then
    cmp -s "$1" "$dest" || say "kept $dest (edited); the shipped version is $1"
    return
  fi
  mkdir -p "$(dirname "$dest")"
  cp "$1" "$dest.tmp.$$"
  chmod 0644 "$dest.tmp.$$"
  mv -f "$dest.tmp.$$" "$dest"
}
config "$(d "$PKGLIBDIR")/share/default-gear" "$SYSCONFDIR/default/gear"
config "$(d "$PKGLIBDIR")/share/containerd-gear.toml" "$SYSCONFDIR/containerd/conf.d/gear.toml"

say "installed gear $(node -p "require('$repo/package.json').version") under PREFIX=$PREFIX${DESTDIR:+ (DESTDIR=$DESTDIR)}"
if [ -z "$DESTDIR" ]; then
  cat >&2 <<EOF
[install] next (README.md, "Install on a host"):
  add at the top of /etc/containerd/config.toml:  imports = ["$SYSCONFDIR/containerd/conf.d/*.toml"]
  systemctl daemon-reload && systemctl enable --now gear-snapshotter && systemctl restart containerd
EOF
fi
