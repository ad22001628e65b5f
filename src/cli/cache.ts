/**
 * `gear cache status|prune`: inspect and trim the node's file pool (level 1).
 *
 * Concurrency with a running daemon: `status` only reads (the directory and
 * the daemon's last snapshot; no lock, no writes), so it always works, and its
 * counters are as of the daemon's last snapshot (written within seconds of a
 * change). `prune` changes the pool, so it takes the pool's single-writer lock
 * `ROOT/pool/.lock`; while a daemon holds it, prune is refused with a message
 * naming the holder. This is deliberate: only the daemon knows which files are
 * pinned or being written, so a prune from outside could race a commit.
 * Stop the daemon to prune, or lower GEAR_CACHE_SIZE and let it evict.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import path from 'node:path';
import { GearError, isClass } from '../core/errors.js';
import { inspectLock, describeHolder } from '../core/pool/lock.js';
import { openPool, type EvictResult, type PoolStat } from '../core/pool/pool.js';
import { formatSize, parseSize } from '../core/pool/size.js';
import { resolveGearRoot } from './pool-root.js';

export const DEFAULT_ROOT = '/var/lib/gear';

export interface CacheStatusResult extends PoolStat {
  /** who holds the pool lock (a running daemon), if anyone */
  lockedBy: string | null;
}

/** Reads the pool's state without changing it. */
export async function cacheStatus(root: string): Promise<CacheStatusResult> {
  const pool = await openPool({ root, readOnly: true });
  try {
    const holder = await inspectLock(path.join(pool.dir, '.lock'));
    return { ...pool.stat(), lockedBy: holder?.alive ? describeHolder(holder) : null };
  } finally {
    await pool.close();
  }
}

export interface CachePruneOptions {
  root: string;
  all?: boolean;
  toBytes?: number;
}

/**
 * Removes unreferenced files (default), every file (`all`), or files in
 * eviction order down to `toBytes`. Throws FailedPrecondition when another
 * process (a running daemon) holds the pool.
 */
export async function cachePrune(opts: CachePruneOptions): Promise<EvictResult & { before: number; after: number }> {
  let pool;
  try {
    pool = await openPool({ root: opts.root, enforceCapOnOpen: false, atimeSampleMs: 0 });
  } catch (err) {
    if (!isClass(err, 'FailedPrecondition')) throw err;
    throw new GearError(
      'FailedPrecondition',
      `prune refused: ${(err as Error).message}. Stop the daemon first, or lower GEAR_CACHE_SIZE and let it evict`,
      { cause: err },
    );
  }
  try {
    const before = pool.stat().bytes;
    const res = await pool.prune({
      ...(opts.all ? { all: true } : {}),
      ...(opts.toBytes !== undefined ? { toBytes: opts.toBytes } : {}),
    });
    return { ...res, before, after: pool.stat().bytes };
  } finally {
    await pool.close();
  }
}

function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function rootOption(): Option {
  return new Option('--root <dir>', 'gear root').env('GEAR_ROOT').default(DEFAULT_ROOT);
}

function pct(n: number, of: number): string {
  return of > 0 ? `${((100 * n) / of).toFixed(1)}%` : '-';
}

function printStatus(s: CacheStatusResult): void {
  const c = s.counters;
  const lines = [
    `pool:          ${path.join(s.root, 'pool')}`,
    `size:          ${formatSize(s.bytes)} of ${formatSize(s.capBytes)} (${pct(s.bytes, s.capBytes)}; evicts above ${formatSize(s.highWatermarkBytes)} down to ${formatSize(s.lowWatermarkBytes)})`,
    `files:         ${s.files} (${s.unverifiedFiles} not yet verified)`,
    `referenced:    ${s.referencedFiles} files, ${formatSize(s.referencedBytes)} (by ${s.owners} layers)`,
    `unreferenced:  ${s.unreferencedFiles} files, ${formatSize(s.unreferencedBytes)}`,
    `hit rate:      ${s.hitRate === null ? '-' : `${(100 * s.hitRate).toFixed(1)}%`} (${c.hits} hits, ${c.misses} misses)`,
    `fetched:       ${formatSize(c.bytesFetched)}`,
    `evicted:       ${c.evictions} files, ${formatSize(c.evictedBytes)}`,
    `in use by:     ${s.lockedBy ?? 'no running gear process'}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

export function registerCache(program: Command): void {
  const cache = program.command('cache').description('inspect and prune the node file pool');

  cache
    .command('status')
    .description('show pool size, cap, files, references and hit rate')
    .addOption(rootOption())
    .option('--json', 'print JSON')
    .action(async (opts: { root: string; json?: boolean }) => {
      // A managed plugin's directories lead to its store (pool-root.ts); a root without a pool says where to look.
      const found = resolveGearRoot(opts.root);
      const s = await cacheStatus(found.root);
      if (opts.json) process.stdout.write(JSON.stringify(s, null, 2) + '\n');
      else {
        if (found.followed) process.stdout.write(`(${opts.root} holds no pool; using the managed plugin's store ${found.root})\n`);
        printStatus(s);
      }
    });

  cache
    .command('prune')
    .description('remove unreferenced files from the pool (refused while a gear daemon runs)')
    .addOption(rootOption())
    .addOption(new Option('--all', 'remove every file, referenced or not').conflicts('to'))
    .addOption(new Option('--to <size>', 'remove files in eviction order until the pool is at most SIZE (e.g. 10GiB)').argParser(sizeArg))
    .option('--json', 'print JSON')
    .action(async (opts: { root: string; all?: boolean; to?: number; json?: boolean }) => {
      const res = await cachePrune({
        root: opts.root,
        ...(opts.all ? { all: true } : {}),
        ...(opts.to !== undefined ? { toBytes: opts.to } : {}),
      });
      if (opts.json) process.stdout.write(JSON.stringify(res) + '\n');
      else
        process.stdout.write(
          `removed ${res.files} files (${formatSize(res.bytes)}); pool now ${formatSize(res.after)}\n`,
        );
    });
}
