import { defineConfig } from 'vitest/config';

// Two projects: unit tests run in parallel; integration tests start real
// daemons (dockerd, registry, containerd) and mount real filesystems, so they
// run one file at a time on these 2-core machines.
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: ['test/unit/**/*.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 60_000,
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/integration/**/*.test.ts'],
          fileParallelism: false,
          testTimeout: 600_000,
          hookTimeout: 900_000,
        },
      },
    ],
  },
});
