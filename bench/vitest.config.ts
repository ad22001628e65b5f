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
    testTimeout: 3_600_000,
    hookTimeout: 900_000,
    retry: 0,
    // The table is printed as it is produced; don't buffer it behind the reporter.
    disableConsoleIntercept: true,
  },
});
