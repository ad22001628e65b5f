import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// `make bench` only (bench/run.sh). Not a test: the root vitest.config.ts
// (make test) includes only test/unit and test/integration, so these files are
// never run by it. One file at a time, no retries, long timeouts: a benchmark
// run starts real dockerds, a registry and (cold deploy) a network namespace.
export default defineConfig({
  root: fileURLToPath(new URL('..', import.meta.url)),
  test: {
    include: ['bench/**/*.bench-run.ts'],
    fileParallelism: false,
    // A full run (12 images x 7 systems x 4 links, the series, re-read) takes well over an hour:
    // 6 h by default (GEAR_BENCH_TIMEOUT_MS). The 1 h this was before killed every full run.
    testTimeout: Number(process.env.GEAR_BENCH_TIMEOUT_MS ?? 6 * 3_600_000),
    hookTimeout: 900_000,
    retry: 0,
    // The table is printed as it is produced; don't buffer it behind the reporter.
    disableConsoleIntercept: true,
  },
});
