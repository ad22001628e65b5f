/**
 * The background scrubber of a daemon's pool (`gear daemon` and `gear
 * snapshotter` both start one through the lazy runtime), and the way
 * `gear cache verify` talks to it.
 *
 * Schedule: every `intervalMs` (GEAR_SCRUB_INTERVAL, default 24h; 0 = off),
 * counted from the end of the previous run, which is recorded, so a restart
 * neither postpones nor repeats a run. Each run re-hashes the whole pool at
 * most `rate` bytes per second (GEAR_SCRUB_RATE, default 50MiB/s) and removes
 * bad files (scrub.ts). Each bad file is logged as an error with its path, the
 * digest its name promises and the one its content has.
 *
 * State file ROOT/pool/.meta/scrub.json (written atomically at the start, at
 * most once a second of progress, and at the end of a run): settings, the
 * fs-verity probe, the run in progress with its progress, the last report
 * and totals. `gear cache status` reads it without a lock.
 *
 * Requests: the pool's single-writer lock keeps `gear cache verify` from
 * opening the pool while a daemon holds it, so it asks: it writes
 * ROOT/pool/.meta/scrub-request.json ({id, rate?}); the daemon (inotify on
 * .meta, and a slow poll as a fallback) takes and deletes it, runs a scrub
 * tagged with that id, and the client follows scrub.json until the report
 * with its id appears. A file, not a socket: it works the same for both
 * frontends and through a managed plugin's propagated mount, where socket
 * paths would exceed 108 bytes.
 */
import { randomBytes } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { describeError, errnoCode, failedPrecondition, invalidArgument, unavailable } from '../errors.js';
import { parseDuration } from '../duration.js';
import { silentLogger, type Logger } from '../log.js';
import { writeFileAtomic } from '../sys/fsutil.js';
import { describeHolder, inspectLock } from './lock.js';
import { DEFAULT_SCRUB_RATE, scrubPool, type ScrubProgress, type ScrubReport, type ScrubTarget } from './scrub.js';
import { formatSize, parseSize } from './size.js';
import type { VerityProbe } from './verity.js';

export const DEFAULT_SCRUB_INTERVAL_MS = 24 * 3_600_000;
export const SCRUB_STATE_FILE = 'scrub.json';
export const SCRUB_REQUEST_FILE = 'scrub-request.json';
/** Bad files kept in the state file (the count is always complete). */
const MAX_RECORDED_BAD = 1000;
const ID_RE = /^[a-zA-Z0-9_-]{1,64}$/;

export type ScrubRecord = ScrubReport & { id: string | null };

export interface ScrubState {
  version: 1;
  pid: number;
  updatedAt: string;
  settings: { rate: number; intervalMs: number };
  /** 'daemon': the settings are a daemon's schedule; 'none': only offline `gear cache verify` runs wrote this file */
  settingsBy: 'daemon' | 'none';
  verity: VerityProbe | null;
  running: { id: string | null; startedAt: string; rate: number; progress: ScrubProgress } | null;
  last: ScrubRecord | null;
  nextRunAt: string | null;
  totals: { runs: number; bad: number; removed: number };
}

/** GEAR_SCRUB_RATE / --scrub-rate: a size per second ("50MiB", "50MiB/s"); must be more than 0. */
export function parseScrubRate(input: string | number, what = 'scrub rate'): number {
  const text = typeof input === 'number' ? input : input.replace(/\s*\/\s*s(ec)?\s*$/i, '');
  let n: number;
  try {
    n = parseSize(text);
  } catch (err) {
    throw invalidArgument(`${what} ${JSON.stringify(input)}: ${(err as Error).message} (per second, e.g. 50MiB)`);
  }
  if (n <= 0) throw invalidArgument(`${what} ${JSON.stringify(input)}: must be more than 0 bytes per second`);
  return n;
}

/** GEAR_SCRUB_INTERVAL / --scrub-interval: "24h", "30m", "0" or "off" (no periodic scrub). Also accepts days ("7d"). */
export function parseScrubInterval(input: string | number, what = 'scrub interval'): number {
  if (input === 0 || (typeof input === 'string' && /^\s*(0+|off)\s*$/i.test(input))) return 0;
  if (typeof input === 'string') {
    const d = /^\s*([0-9]+(?:\.[0-9]+)?)\s*d\s*$/.exec(input);
    if (d) return Math.round(Number(d[1]) * 86_400_000);
  }
  return parseDuration(input, what);
}

/** "24h", "90m", "45s": the largest whole unit. */
export function formatInterval(ms: number): string {
  // Days only from 2 on: "24h" reads better than "1d".
  for (const [unit, n] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000], ['s', 1000]] as const) {
    if (ms >= (unit === 'd' ? 2 * n : n) && ms % n === 0) return `${ms / n}${unit}`;
  }
  return `${ms}ms`;
}

/** Reads ROOT/pool/.meta/scrub.json, or null. */
export async function readScrubState(poolDir: string): Promise<ScrubState | null> {
  try {
    const s = JSON.parse(await fs.readFile(path.join(poolDir, '.meta', SCRUB_STATE_FILE), 'utf8')) as ScrubState;
    return s && s.version === 1 ? s : null;
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || err instanceof SyntaxError) return null;
    throw err;
  }
}

/** The "Pool Integrity" status line from settings and the fs-verity probe. */
export function integrityLine(settings: { rate: number; intervalMs: number }, verity: VerityProbe | null): string {
  const scrub =
    settings.intervalMs > 0
      ? `scrub every ${formatInterval(settings.intervalMs)} at ${formatSize(settings.rate).replace(' ', '')}/s`
      : 'no periodic scrub (GEAR_SCRUB_INTERVAL=0; files are verified when fetched, `gear cache verify` scrubs on demand)';
  return `${scrub} (fs-verity: ${verity ? verity.detail : 'not probed'})`;
}

/** The "Pool Scrub" status line: the run in progress, else the last run. */
export function lastScrubLine(state: Pick<ScrubState, 'running' | 'last' | 'nextRunAt' | 'totals'>): string {
  const next = state.nextRunAt ? `; next ${state.nextRunAt}` : '';
  if (state.running) {
    const p = state.running.progress;
    return `running since ${state.running.startedAt}: ${p.files}/${p.totalFiles} files, ${formatSize(p.bytes)} of ${formatSize(p.totalBytes)}, ${p.bad} bad`;
  }
  if (!state.last) return `never ran${next}`;
  const l = state.last;
  const how = l.aborted ? ' (stopped before the end)' : '';
  return `last ${l.finishedAt}${how}: ${l.files} files, ${formatSize(l.bytes)}, ${l.bad} bad, ${l.removed} removed; since first run: ${state.totals.bad} bad, ${state.totals.removed} removed${next}`;
}

export interface ScrubberOptions {
  pool: ScrubTarget;
  /** bytes/s; default DEFAULT_SCRUB_RATE */
  rate?: number;
  /** ms between runs; 0: no periodic runs (requests are still served); default 24h */
  intervalMs?: number;
  verity?: VerityProbe | null;
  logger?: Logger;
  /** poll of the request file besides inotify (default 5000 ms) */
  pollMs?: number;
  /** least time between progress writes of the state file (default 1000 ms) */
  progressMs?: number;
  /**
   * false: keep the settings (and fs-verity probe, unless given) recorded by the previous writer of the
   * state file, e.g. for an offline `gear cache verify`, which is no schedule of its own. Default true.
   */
  recordSettings?: boolean;
  /** Called on each progress step of a run (e.g. an offline `gear cache verify`'s progress line). */
  onProgress?: (p: ScrubProgress) => void;
}

export class PoolScrubber {
  readonly rate: number;
  readonly intervalMs: number;
  private readonly log: Logger;
  private readonly metaDir: string;
  private state: ScrubState;
  private timer: NodeJS.Timeout | undefined;
  private poller: NodeJS.Timeout | undefined;
  private watcher: FSWatcher | undefined;
  private current: Promise<ScrubRecord> | undefined;
  private readonly controller = new AbortController();
  private pending = 0;
  private saving: Promise<void> = Promise.resolve();
  private checking: Promise<void> | undefined;
  private lastProgressWrite = 0;
  private closed = false;
  private stopping = false;

  private constructor(private readonly opts: ScrubberOptions, prior: ScrubState | null) {
    this.rate = opts.rate ?? DEFAULT_SCRUB_RATE;
    this.intervalMs = opts.intervalMs ?? DEFAULT_SCRUB_INTERVAL_MS;
    this.log = opts.logger ?? silentLogger();
    this.metaDir = path.join(opts.pool.dir, '.meta');
    this.state = {
      version: 1,
      pid: process.pid,
      updatedAt: new Date().toISOString(),
      settings: opts.recordSettings === false && prior ? prior.settings : { rate: this.rate, intervalMs: this.intervalMs },
      settingsBy: opts.recordSettings === false ? (prior?.settingsBy ?? 'none') : 'daemon',
      verity: opts.verity ?? (opts.recordSettings === false ? (prior?.verity ?? null) : null),
      running: null,
      last: prior?.last ?? null,
      nextRunAt: opts.recordSettings === false ? (prior?.nextRunAt ?? null) : null,
      totals: prior?.totals ?? { runs: 0, bad: 0, removed: 0 },
    };
  }

  /** Starts the schedule and the request watch. */
  static async start(opts: ScrubberOptions): Promise<PoolScrubber> {
    const s = new PoolScrubber(opts, await readScrubState(opts.pool.dir).catch(() => null));
    await fs.mkdir(s.metaDir, { recursive: true, mode: 0o700 });
    if (s.intervalMs > 0) {
      const lastEnd = s.state.last ? Date.parse(s.state.last.finishedAt) : NaN;
      const base = Number.isFinite(lastEnd) ? lastEnd : Date.now();
      s.schedule(Math.max(0, base + s.intervalMs - Date.now()));
    }
    await s.save();
    try {
      s.watcher = watch(s.metaDir, (_ev, name) => {
        if (name === SCRUB_REQUEST_FILE) s.checkRequests();
      });
      s.watcher.on('error', (err) => s.log.warn({ err: describeError(err) }, 'scrub: request watch failed; polling only'));
      s.watcher.unref();
    } catch (err) {
      s.log.warn({ err: describeError(err) }, 'scrub: cannot watch for requests; polling only');
    }
    s.poller = setInterval(() => s.checkRequests(), opts.pollMs ?? 5000);
    s.poller.unref();
    s.checkRequests();
    return s;
  }

  /** "Pool Integrity" and "Pool Scrub" status lines. */
  status(): Array<[string, string]> {
    return [
      ['Pool Integrity', integrityLine(this.state.settings, this.state.verity)],
      ['Pool Scrub', lastScrubLine(this.state)],
    ];
  }

  stats(): ScrubState {
    return structuredClone(this.state);
  }

  /** Runs a scrub now (after the one in progress, if any). */
  runNow(id: string | null = null, rate = this.rate): Promise<ScrubRecord> {
    const prev = this.current ?? Promise.resolve(undefined);
    this.pending++;
    const run = prev.then(
      () => this.run(id, rate),
      () => this.run(id, rate),
    );
    this.current = run;
    const done = () => {
      this.pending--;
      if (this.current === run) this.current = undefined;
    };
    void run.then(done, done);
    return run;
  }

  private schedule(ms: number): void {
    if (this.timer) clearTimeout(this.timer);
    if (this.closed || this.stopping || this.intervalMs <= 0) return;
    const at = Date.now() + ms;
    this.state.nextRunAt = new Date(at).toISOString();
    // setTimeout holds at most 2^31-1 ms; a longer wait re-arms.
    const step = Math.min(ms, 2 ** 31 - 1);
    this.timer = setTimeout(() => {
      if (at - Date.now() > 1000) return this.schedule(at - Date.now());
      this.runNow().catch((err: unknown) => this.log.error({ err: describeError(err) }, 'scrub: run failed'));
    }, step);
    this.timer.unref();
  }

  private async run(id: string | null, rate: number): Promise<ScrubRecord> {
    if (this.closed || this.stopping) throw failedPrecondition('scrub: the pool is closing');
    const startedAt = new Date().toISOString();
    this.state.running = { id, startedAt, rate, progress: { files: 0, bytes: 0, totalFiles: 0, totalBytes: 0, bad: 0 } };
    this.state.nextRunAt = null;
    await this.save();
    this.log.info({ id, rate }, 'scrub: started');
    let report: ScrubReport;
    try {
      report = await scrubPool(this.opts.pool, {
        rate,
        signal: this.controller.signal,
        onProgress: (p) => {
          if (this.state.running) this.state.running.progress = p;
          this.opts.onProgress?.(p);
          const now = Date.now();
          if (now - this.lastProgressWrite >= (this.opts.progressMs ?? 1000)) {
            this.lastProgressWrite = now;
            void this.save();
          }
        },
        onBad: (b) => {
          this.log.error(
            { path: b.path, expected: b.digest, actual: b.actual, size: b.size, removed: b.removed, outcome: b.outcome },
            b.removed ? 'scrub: corrupt pool file removed (the next open fetches it again)' : 'scrub: corrupt pool file found',
          );
        },
      });
    } catch (err) {
      this.state.running = null;
      this.schedule(this.intervalMs);
      await this.save();
      throw err;
    }
    const rec: ScrubRecord = { ...report, id, badFiles: report.badFiles.slice(0, MAX_RECORDED_BAD) };
    this.state.running = null;
    this.state.last = rec;
    this.state.totals = { runs: this.state.totals.runs + 1, bad: this.state.totals.bad + report.bad, removed: this.state.totals.removed + report.removed };
    this.schedule(this.intervalMs);
    await this.save();
    const summary = { id, files: report.files, bytes: report.bytes, bad: report.bad, removed: report.removed, gone: report.gone, ignored: report.ignored, errors: report.errors.length, aborted: report.aborted };
    if (report.bad || report.errors.length) this.log.warn(summary, 'scrub: finished; bad files found');
    else this.log.info(summary, 'scrub: finished');
    return { ...report, id };
  }

  /**
   * Writes the state file. Saves are serialized (one rename at a time, each of the state as it is
   * when that write starts), so a slow progress write can never land after the final one.
   */
  private save(): Promise<void> {
    if (this.opts.pool.readOnly) return Promise.resolve();
    const next = this.saving.then(async () => {
      this.state.updatedAt = new Date().toISOString();
      await writeFileAtomic(path.join(this.metaDir, SCRUB_STATE_FILE), JSON.stringify(this.state), 0o600).catch((err: unknown) =>
        this.log.warn({ err: describeError(err) }, 'scrub: cannot write the state file'),
      );
    });
    this.saving = next;
    return next;
  }

  /** Takes a pending request file, if any (serialized). */
  private checkRequests(): void {
    if (this.closed || this.stopping || this.checking) return;
    this.checking = this.takeRequest()
      .catch((err: unknown) => this.log.warn({ err: describeError(err) }, 'scrub: bad request'))
      .finally(() => (this.checking = undefined));
  }

  private async takeRequest(): Promise<void> {
    const file = path.join(this.metaDir, SCRUB_REQUEST_FILE);
    let text: string;
    try {
      const fh = await fs.open(file, 'r');
      try {
        text = (await fh.read(Buffer.alloc(4096), 0, 4096, 0)).buffer.toString('utf8').replace(/\0+$/, '');
      } finally {
        await fh.close();
      }
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return;
      throw err;
    }
    await fs.rm(file, { force: true });
    const req = JSON.parse(text) as { id?: unknown; rate?: unknown };
    if (typeof req.id !== 'string' || !ID_RE.test(req.id)) throw invalidArgument(`scrub request ${file}: id must match ${ID_RE}`);
    let rate = this.rate;
    if (req.rate !== undefined) {
      if (typeof req.rate !== 'number' || !(req.rate > 0) || req.rate > 2 ** 53) throw invalidArgument(`scrub request ${file}: rate must be a positive number of bytes/s`);
      rate = req.rate;
    }
    if (this.pending >= 8) throw unavailable(`scrub request ${req.id}: 8 requests are already queued`);
    this.log.info({ id: req.id, rate }, 'scrub: requested by gear cache verify');
    this.runNow(req.id, rate).catch((err: unknown) => this.log.error({ err: describeError(err) }, 'scrub: requested run failed'));
  }

  /** Stops the schedule and a run in progress (its report is recorded as aborted). */
  async close(): Promise<void> {
    if (this.closed || this.stopping) return;
    this.stopping = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.poller) clearInterval(this.poller);
    this.watcher?.close();
    this.controller.abort();
    await this.checking;
    await this.current?.catch(() => undefined);
    this.closed = true;
    this.state.nextRunAt = null;
    await this.save();
  }
}

export interface RequestScrubOptions {
  rate?: number;
  /** Called whenever the daemon reports progress of this run. */
  onProgress?: (p: ScrubProgress) => void;
  /** How long the daemon may take to pick the request up (default 15 s). */
  pickupTimeoutMs?: number;
  /** How long the state file may stay unchanged during the run (default 120 s). */
  stallTimeoutMs?: number;
  pollMs?: number;
}

/**
 * Asks the process holding the pool (a daemon) to scrub now and waits for its
 * report. Throws Unavailable when it does not pick the request up or stops
 * answering.
 */
export async function requestScrub(poolDir: string, opts: RequestScrubOptions = {}): Promise<ScrubRecord> {
  const id = `${Date.now().toString(36)}-${randomBytes(6).toString('hex')}`;
  const meta = path.join(poolDir, '.meta');
  const reqFile = path.join(meta, SCRUB_REQUEST_FILE);
  const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
  const pollMs = opts.pollMs ?? 200;
  const holderNow = async () => {
    const h = await inspectLock(path.join(poolDir, '.lock'));
    return h?.alive ? h : null;
  };
  await writeFileAtomic(reqFile, JSON.stringify({ id, ...(opts.rate ? { rate: opts.rate } : {}) }), 0o600);
  const pickupBy = Date.now() + (opts.pickupTimeoutMs ?? 15_000);
  let picked = false;
  let lastUpdate = '';
  let lastChange = Date.now();
  try {
    for (let i = 0; i < 10_000_000; i++) {
      const st = await readScrubState(poolDir);
      if (st?.last?.id === id) return st.last;
      if (st && st.updatedAt !== lastUpdate) {
        lastUpdate = st.updatedAt;
        lastChange = Date.now();
      }
      if (st?.running?.id === id) opts.onProgress?.(st.running.progress);
      if (!picked) {
        picked = !(await fs.access(reqFile).then(() => true, () => false));
        if (!picked && Date.now() > pickupBy) {
          const h = await holderNow();
          throw unavailable(
            `gear cache verify: ${h ? `the gear process holding the pool (${describeHolder(h)})` : 'no process'} did not take the scrub request within ${Math.round((opts.pickupTimeoutMs ?? 15_000) / 1000)} s; ` +
              'it may be a version without scrub, or have lazy pull off. Stop it and run `gear cache verify` again to scrub offline',
          );
        }
      } else {
        if (!(await holderNow())) throw unavailable('gear cache verify: the daemon scrubbing the pool stopped before it finished; run `gear cache verify` again');
        if (Date.now() - lastChange > (opts.stallTimeoutMs ?? 120_000)) {
          throw unavailable(`gear cache verify: the daemon's scrub state ${path.join(meta, SCRUB_STATE_FILE)} did not change for ${Math.round((opts.stallTimeoutMs ?? 120_000) / 1000)} s`);
        }
      }
      await sleep(pollMs);
    }
    throw unavailable('gear cache verify: gave up waiting for the daemon');
  } finally {
    if (!picked) await fs.rm(reqFile, { force: true }).catch(() => undefined);
  }
}
