import { defineConfig } from 'vitest/config';

// Four projects: unit tests run in parallel; hostile (deterministic corpora of
// hostile inputs through the real decoders and apply code, test/hostile) and
// fuzz (property-based fuzzing of the decoders with fast-check, fixed seed,
// test/fuzz) run with them; integration tests start real daemons (dockerd,
// registry, containerd) and mount real filesystems, so they run one file at a
// time on these 2-core machines, after the others.
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
          name: 'hostile',
          include: ['test/hostile/**/*.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 60_000,
        },
      },
      {
        test: {
          name: 'fuzz',
          include: ['test/fuzz/**/*.test.ts'],
          // Each property runs tens of thousands of cases; the bound is far above what they take.
          testTimeout: 300_000,
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
