/**
 * The pool's shapes: its options, counters and status (public), and the
 * in-memory entry, snapshot and reference records (pool.ts's own).
 */
import type { Logger } from '../log.js';

export interface PoolOptions {
  /** Gear root; the pool lives in ROOT/pool. */
  root: string;
  /**
   * Size cap, bytes or a human size ("20GiB", see parseSize). Default: the cap
   * recorded by the previous run, else DEFAULT_CACHE_SIZE.
   */
  capBytes?: number | string;
  /** Fraction of the cap above which eviction starts (default 0.95). */
  highWatermark?: number;
  /** Fraction of the cap eviction brings usage down to (default 0.85). */
  lowWatermark?: number;
  logger?: Logger;
  /** Inspect only: no lock, no cleanup, no writes (for `gear cache status`). Default false. */
  readOnly?: boolean;
  /** Delay before a changed snapshot is written (default 2000 ms). */
  snapshotDelayMs?: number;
  /** Interval of atime sampling (default 15 min; 0 disables the timer). */
  atimeSampleMs?: number;
  /** Evict at open if the pool is over its high watermark (default true). */
  enforceCapOnOpen?: boolean;
  /** Clock for recency, ms since the epoch (default Date.now; tests inject one). */
  clock?: () => number;
}

/** Cumulative counters; they survive restarts through the snapshot. */
export interface PoolCounters {
  /** `open()` calls that found the file. */
  hits: number;
  /** `open()` calls that did not. */
  misses: number;
  /** Bytes committed by writers (new content that entered the pool). */
  bytesFetched: number;
  /** Files removed by eviction or prune. */
  evictions: number;
  evictedBytes: number;
}

export interface PoolStat {
  root: string;
  capBytes: number;
  highWatermarkBytes: number;
  lowWatermarkBytes: number;
  files: number;
  bytes: number;
  referencedFiles: number;
  referencedBytes: number;
  unreferencedFiles: number;
  unreferencedBytes: number;
  unverifiedFiles: number;
  owners: number;
  pinned: number;
  writing: number;
  counters: PoolCounters;
  /** hits / (hits + misses), or null before any open() */
  hitRate: number | null;
}

export interface Entry {
  size: number;
  /** ms since the epoch */
  lastUse: number;
  mtimeMs: number;
  verified: boolean;
}

export type SnapshotEntry = [size: number, lastUse: number, mtimeMs: number, verified: 0 | 1];
export interface Snapshot {
  version: number;
  savedAt: string;
  capBytes: number;
  counters: PoolCounters;
  entries: Record<string, SnapshotEntry>;
}

export interface RefsRecord {
  owner: string;
  digests: string[];
}
