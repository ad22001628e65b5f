#!/bin/bash
# Usage: bench/read-ahead/trace-opens.sh ROOTFS OUT CMD...
# Runs CMD in a chroot of ROOTFS (a debootstrap tree, e.g. /var/cache/gear-test/NAME-bookworm.tar
# unpacked) under strace and writes to OUT the regular files it opened or executed, first use first,
# as paths inside ROOTFS: the miss sequence of a cold start without a profile, for sim.mjs.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 ROOTFS OUT CMD..." >&2; exit 2; }
command -v strace >/dev/null || { echo "trace-opens: strace is missing (apt-get install strace)" >&2; exit 2; }
root=$(realpath "$1"); out=$2; shift 2
trace=$(mktemp); trap 'rm -f "$trace"' EXIT
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  strace -f -y -qq -e trace=openat,open,execve -o "$trace" chroot "$root" "$@" >/dev/null
python3 - "$root" "$trace" >"$out" <<'PY'
import os, re, sys
root, trace = sys.argv[1], sys.argv[2]
seen, first = set(), True
for line in open(trace, errors='replace'):
    m = re.search(r'execve\("([^"]*)".*= 0$', line)
    if m:
        if first:  # the host's chroot itself
            first = False
            continue
        p = os.path.realpath(root + m.group(1))
    else:
        m = re.search(r'= \d+<([^>]*)>$', line.strip())
        if not m:
            continue
        p = m.group(1)
    if not p.startswith(root + '/'):
        continue
    p = p[len(root) + 1:]
    if os.path.isfile(os.path.join(root, p)) and p not in seen:
        seen.add(p)
        print(p)
PY
echo "trace-opens: $(wc -l <"$out") files opened by $* -> $out" >&2
