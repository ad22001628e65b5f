#!/usr/bin/env bash
# Scale benchmark (not a test): an image of GEAR_SCALE_FILES (default 1,000,000)
# files is generated as a tar stream (no real filesystem), converted with
# `gear convert` into a local docker-registry, pulled by a private dockerd on
# the gear driver, and a container lists it (`ls`, `find | wc -l`). Records wall
# times and the peak RSS (VmHWM) of the converter and of the gear daemon.
#
#   bash bench/scale/million.sh                 (needs root and dist/: runs tsc first)
#   GEAR_SCALE_FILES=50000 bash bench/scale/million.sh
#
# Output: a summary on stdout and bench/results/scale-<files>-<date>-<sha>.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "scale bench: needs root (dockerd, mounts)" >&2
  exit 1
fi
npx tsc -p tsconfig.json >/dev/null
exec npx vitest run --config bench/scale/vitest.config.ts --reporter=default "$@"
