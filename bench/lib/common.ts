/** Shared plumbing of the benchmark sections: config from the environment, interleaving, logging. */
import type { Dockerd } from '../../test/helpers/dockerd.js';
import type { Driver, Report } from './report.js';

export interface BenchConfig {
  /** Repetitions per metric and driver (>= 5 for a reported run). */
  reps: number;
  /** Repetitions of the read tasks (short and noisy: more than reps). */
  readReps: number;
  /** Containers per lifecycle repetition. */
  containers: number;
  /** Cold-deploy benchmark: 'auto' (when the lazy path works), 'on', 'off'. */
  cold: 'auto' | 'on' | 'off';
  /** Repetitions of each cold deploy (a fresh pair of dockerds each). */
  coldReps: number;
  /** Gear daemon at debug level, per-method plugin request latencies per section. */
  profile: boolean;
  /** Sections to run (default all). */
  sections: string[];
}

function int(name: string, dflt: number, min: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) throw new Error(`${name}=${v}: want an integer >= ${min}`);
  return n;
}

export function configFromEnv(): BenchConfig {
  const cold = (process.env.GEAR_BENCH_COLD ?? 'auto') as BenchConfig['cold'];
  if (!['auto', 'on', 'off'].includes(cold)) throw new Error(`GEAR_BENCH_COLD=${cold}: want auto, on or off`);
  return {
    reps: int('GEAR_BENCH_REPS', 5, 1),
    readReps: int('GEAR_BENCH_READ_REPS', 9, 1),
    containers: int('GEAR_BENCH_CONTAINERS', 20, 1),
    cold,
    coldReps: int('GEAR_BENCH_COLD_REPS', 2, 1),
    profile: process.env.GEAR_BENCH_PROFILE === '1',
    // `make bench BENCH=cold` (or GEAR_BENCH_SECTIONS=cold): the cold-deploy section alone.
    sections: (process.env.GEAR_BENCH_SECTIONS ?? 'lifecycle,read,cold-deploy,reread,series')
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean)
      .map((s) => (s === 'cold' ? 'cold-deploy' : s)),
  };
}

export const log = (s: string): void => {
  process.stdout.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);
};

/**
 * The driver order of repetition i: A/B, then B/A, … (ABBA), so that neither
 * driver always runs first after a pause, and the pair of a repetition is
 * measured back to back.
 */
export const orderOf = (i: number): Driver[] => (i % 2 === 0 ? ['overlay2', 'gear'] : ['gear', 'overlay2']);

export interface Pair {
  overlay2: Dockerd;
  gear: Dockerd;
}

/** The context a benchmark section receives. */
export interface SectionContext {
  cfg: BenchConfig;
  report: Report;
  /** Long-lived dockerds (one per driver), started once for the run. */
  pair: Pair;
  repoRoot: string;
}

export const nowS = (): number => Number(process.hrtime.bigint()) / 1e9;
