#!/usr/bin/env bash
# Benchmark of `gear convert` (not a test): conversion throughput in MB/s of
# uncompressed layer data, and registry storage of three images sharing a base
# stored as Docker images (gzip layers, pushed with skopeo) vs as Gear images.
#
#   bench/convert.sh            (needs dist/: runs tsc first; needs the minbase tar)
#   bench/convert.sh --analyze-only   only `gear analyze` over the three images (table; plot in $TMPDIR/gear-bench-analyze.png or $GEAR_BENCH_PLOT)
#
# Images: A = minbase; B = A + python3 (the host's /usr/lib/python3.*, /usr/bin/python3*);
# C = B + an "update" layer (perl modules from the host plus 5% of B's python files changed).
set -euo pipefail
cd "$(dirname "$0")/.."
npx tsc -p tsconfig.json >/dev/null || true   # emit even if another module has type errors
exec node bench/convert.mjs "$@"
