import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

// bench/scale/million.sh only: not part of `make test` nor of `make bench`.
export default defineConfig({
  root: fileURLToPath(new URL('../..', import.meta.url)),
  test: {
    include: ['bench/scale/*.scale-run.ts'],
    fileParallelism: false,
    testTimeout: 7_200_000,
    hookTimeout: 900_000,
    retry: 0,
    disableConsoleIntercept: true,
  },
});
