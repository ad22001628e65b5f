#!/usr/bin/env bash
# make bench: overlay2 vs Gear (and eStargz) benchmark (not a test). Needs root,
# the build (make build ran scripts/install-deps.sh and tsc) and the cached
# minbase image (/var/cache/gear-test; built on first use, ~3 min). Installs the
# bench-only packages (scripts/install-bench-deps.sh: ctr-remote and the stargz
# library) and builds the eStargz snapshotter daemon (bench/estargz/build.sh,
# ~2 min the first time) when missing.
#
#   bash bench/run.sh                      full run: hours since issue 11 (12 images x 7
#                                          systems x 4 links; the first run also builds
#                                          the debootstrap rootfs caches, a few min each)
#   GEAR_BENCH_REPS=3 GEAR_BENCH_SECTIONS=lifecycle bash bench/run.sh
#   make bench BENCH=cold                  the cold-deploy section alone: overlay2,
#                                          gear, gear-opt, gear-ctr, gear-opt-ctr,
#                                          estargz, estargz-opt side by side
#                                          (bench/README.md; subsets by environment)
#   make bench BENCH=series                the five-version registry storage series
#   make bench BENCH=reread                re-read throughput after a lazy fetch
#
# Every run ends with issue 15's targets table (PASS/FAIL/not measured) and, with
# cold-deploy samples, writes bench/results/<date>-<sha>-deploy.png beside the JSON.
# Output: the tables on stdout, raw samples in bench/results/<date>-<sha>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "bench: needs root (dockerd, mounts, network namespaces)" >&2
  exit 1
fi
[ -f dist/cli/gear.js ] || { echo "bench: dist/ missing: run make build" >&2; exit 1; }
bash scripts/install-bench-deps.sh
bash bench/estargz/build.sh
# A section subset (make bench BENCH=cold, GEAR_BENCH_SECTIONS=…) names sections of
# foundation.bench-run.ts: run that file alone, not the other *.bench-run.ts files.
if [ -n "${GEAR_BENCH_SECTIONS:-}" ] && [ $# -eq 0 ]; then
  set -- bench/foundation.bench-run.ts
fi
exec npx vitest run --config bench/vitest.config.ts --reporter=default "$@"
