/**
 * `gear cache status|prune|verify`: inspect, trim and check the node's file pool (level 1).
 *
 * Concurrency with a running daemon: `status` only reads (the directory and
 * the daemon's last snapshot; no lock, no writes), so it always works, and its
 * counters are as of the daemon's last snapshot (written within seconds of a
 * change). `prune` changes the pool, so it takes the pool's single-writer lock
 * `ROOT/pool/.lock`; while a daemon holds it, prune is refused with a message
 * naming the holder. This is deliberate: only the daemon knows which files are
 * pinned or being written, so a prune from outside could race a commit.
 * Stop the daemon to prune, or lower GEAR_CACHE_SIZE and let it evict.
 *
 * `verify` re-hashes every pool file now and removes the bad ones (scrub.ts):
 * offline when no process holds the pool, else by asking the daemon that
 * holds it over its control socket (control/server.ts; a daemon without one
 * is asked through the request file it watches, scrubber.ts), which scrubs
 * with its own bookkeeping of writes and evictions. Exit code 1 when bad files were found.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import path from 'node:path';
import { GearError, isClass } from '../core/errors.js';
import { controlCall } from '../core/control/client.js';
import { inspectLock, describeHolder } from '../core/pool/lock.js';
import { openPool, type EvictResult, type PoolStat } from '../core/pool/pool.js';
import type { ScrubProgress } from '../core/pool/scrub.js';
import {
  PoolScrubber,
  integrityLine,
  lastScrubLine,
  parseScrubRate,
  readScrubState,
  requestScrub,
  type ScrubRecord,
  type ScrubState,
} from '../core/pool/scrubber.js';
import { formatSize, parseSize } from '../core/pool/size.js';
import { probeFsVerity, type VerityProbe } from '../core/pool/verity.js';
import { resolveGearRoot } from './pool-root.js';

export const DEFAULT_ROOT = '/var/lib/gear';

export interface CacheStatusResult extends PoolStat {
  /** who holds the pool lock (a running daemon), if anyone */
  lockedBy: string | null;
  /** "Pool Integrity" line: the scrub schedule and fs-verity support */
  integrity: string;
  /** "Pool Scrub" line: the run in progress or the last one */
  scrub: string;
  /** the scrub state file as the last daemon (or offline verify) wrote it */
  scrubState: ScrubState | null;
}

/** Reads the pool's state without changing it. */
export async function cacheStatus(root: string): Promise<CacheStatusResult> {
  const pool = await openPool({ root, readOnly: true });
  try {
    const holder = await inspectLock(path.join(pool.dir, '.lock'));
    const state = await readScrubState(pool.dir).catch(() => null);
    let verity: VerityProbe | null = state?.verity ?? null;
    const any = pool.list()[0];
    if (!verity && any) verity = await probeFsVerity(pool.dir, pool.path(any.digest)).catch(() => null);
    const integrity =
      state && state.settingsBy !== 'none'
        ? integrityLine(state.settings, verity) + (holder?.alive ? '' : ' (settings of the last gear daemon; none is running)')
        : `no gear daemon with scrub has opened this pool: files are verified when fetched and by \`gear cache verify\` (fs-verity: ${verity ? verity.detail : 'not probed'})`;
    return {
      ...pool.stat(),
      lockedBy: holder?.alive ? describeHolder(holder) : null,
      integrity,
      scrub: state ? lastScrubLine(state) : 'never ran',
      scrubState: state,
    };
  } finally {
    await pool.close();
  }
}

export interface CacheVerifyOptions {
  root: string;
  /** bytes per second (default: the daemon's setting, offline 50 MiB/s) */
  rate?: number;
  onProgress?: (p: ScrubProgress) => void;
}

/**
 * Scrubs the pool now: offline when no process holds it, else by the daemon
 * that holds it. The report lists each bad file and whether it was removed.
 */
export async function cacheVerify(opts: CacheVerifyOptions): Promise<ScrubRecord & { by: 'offline' | 'daemon' }> {
  const dir = path.join(path.resolve(opts.root), 'pool');
  const holder = await inspectLock(path.join(dir, '.lock'));
  if (holder?.alive) {
    // The daemon's control socket; a daemon without one (an older version) takes the request file.
    try {
      const rec = await controlCall<ScrubRecord>(opts.root, '/v1/cache/verify', opts.rate ? { rate: String(Math.round(opts.rate)) } : {}, (p) => opts.onProgress?.(p as ScrubProgress));
      return { ...rec, by: 'daemon' };
    } catch (err) {
      if (!(isClass(err, 'FailedPrecondition') && /no Gear daemon is serving/.test((err as Error).message)) && !/answered 404/.test(String((err as Error).message))) throw err;
    }
    const rec = await requestScrub(dir, { ...(opts.rate ? { rate: opts.rate } : {}), ...(opts.onProgress ? { onProgress: opts.onProgress } : {}) });
    return { ...rec, by: 'daemon' };
  }
  const pool = await openPool({ root: opts.root, enforceCapOnOpen: false, atimeSampleMs: 0 });
  try {
    const verity = await probeFsVerity(path.join(pool.dir, '.staging')).catch(() => null);
    const scrubber = await PoolScrubber.start({ pool, intervalMs: 0, recordSettings: false, verity, pollMs: 3_600_000, ...(opts.onProgress ? { onProgress: opts.onProgress } : {}), ...(opts.rate ? { rate: opts.rate } : {}) });
    try {
      const rec = await scrubber.runNow(null);
      return { ...rec, by: 'offline' };
    } finally {
      await scrubber.close();
    }
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

function rateArg(value: string): number {
  try {
    return parseScrubRate(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** A progress line on a terminal (rewritten in place), else one line every 10 s. */
function progressPrinter(): { update(p: ScrubProgress): void; end(): void } {
  const tty = process.stderr.isTTY;
  let last = 0;
  let shown = false;
  return {
    update(p) {
      const now = Date.now();
      if (now - last < (tty ? 200 : 10_000)) return;
      last = now;
      const line = `verify: ${p.files}/${p.totalFiles} files, ${formatSize(p.bytes)} of ${formatSize(p.totalBytes)} (${pct(p.bytes, p.totalBytes)}), ${p.bad} bad`;
      process.stderr.write(tty ? `\r${line}\x1b[K` : `${line}\n`);
      shown = true;
    },
    end() {
      if (tty && shown) process.stderr.write('\n');
    },
  };
}

function printVerify(r: ScrubRecord & { by: 'offline' | 'daemon' }): void {
  const out: string[] = [];
  for (const b of r.badFiles) {
    out.push(`BAD ${b.path}: expected ${b.digest}, content ${b.actual} (${b.size} bytes); ${b.removed ? 'removed, will be fetched again on next open' : `not removed (${b.outcome})`}`);
  }
  if (r.bad > r.badFiles.length) out.push(`... and ${r.bad - r.badFiles.length} more bad files (see the daemon log)`);
  for (const e of r.errors) out.push(`ERROR ${e.path}: ${e.error}`);
  const rate = r.rate ? `at most ${formatSize(r.rate)}/s` : 'unlimited rate';
  out.push(
    `verified ${r.files} files, ${formatSize(r.bytes)} (${r.by === 'daemon' ? 'by the running daemon' : 'offline'}, ${rate}): ` +
      `${r.bad} bad, ${r.removed} removed, ${r.gone} evicted meanwhile, ${r.ignored} ignored (not named by a digest)` +
      (r.aborted ? '; STOPPED before the end' : ''),
  );
  process.stdout.write(out.join('\n') + '\n');
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
    `integrity:     ${s.integrity}`,
    `scrub:         ${s.scrub}`,
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
      // A managed plugin's directories lead to its store (pool-root.ts), for prune and verify too; a root
      // without a pool says where to look (rather than opening an empty pool there).
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
        root: resolveGearRoot(opts.root).root,
        ...(opts.all ? { all: true } : {}),
        ...(opts.to !== undefined ? { toBytes: opts.to } : {}),
      });
      if (opts.json) process.stdout.write(JSON.stringify(res) + '\n');
      else
        process.stdout.write(
          `removed ${res.files} files (${formatSize(res.bytes)}); pool now ${formatSize(res.after)}\n`,
        );
    });

  cache
    .command('verify')
    .description('re-hash every pool file now and remove those that do not match their digest (exit code 1 when any did)')
    .addOption(rootOption())
    .addOption(new Option('--rate <size>', 'read at most SIZE per second (default: the daemon\'s GEAR_SCRUB_RATE, offline 50MiB)').argParser(rateArg))
    .option('--json', 'print the report as JSON')
    .action(async (opts: { root: string; rate?: number; json?: boolean }) => {
      const progress = progressPrinter();
      let res;
      try {
        res = await cacheVerify({ root: resolveGearRoot(opts.root).root, ...(opts.rate ? { rate: opts.rate } : {}), onProgress: (p) => progress.update(p) });
      } finally {
        progress.end();
      }
      if (opts.json) process.stdout.write(JSON.stringify(res, null, 2) + '\n');
      else printVerify(res);
      if (res.bad > 0 || res.errors.length > 0 || res.aborted) process.exitCode = 1;
    });
}
