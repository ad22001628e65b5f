/**
 * The pool's single-writer lock, `ROOT/pool/.lock`.
 *
 * One process at a time may change the pool (the daemon, or `gear cache
 * prune` while no daemon runs). Node has no flock(2), so the lock is a file
 * created atomically (write a temp file, then link(2) it to `.lock`, which
 * fails with EEXIST if a holder exists) that records who holds it:
 *
 *   { "pid": 123, "pidNs": "pid:[4026531836]", "startTicks": "98765", "token": "…", "acquiredAt": "…" }
 *
 * A holder renews the lease by touching the file's mtime every `renewMs`.
 * Someone finding the file decides whether the holder is alive:
 *   - same pid namespace: the process with that pid exists and has the same
 *     start time (/proc/PID/stat field 22), so pid reuse is not mistaken for life;
 *   - another pid namespace (the managed plugin runs in its own): the lease is
 *     fresh, i.e. renewed within `staleMs`.
 * A dead holder's lock is removed and taken over. Known gap: two processes
 * that both find the same dead lock at the same instant can both take it
 * over; that needs two pool writers starting within microseconds of each
 * other after a crash.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, readlinkSync } from 'node:fs';
import fs from 'node:fs/promises';
import { errnoCode, failedPrecondition } from '../errors.js';

/** Default lease renewal interval (10 s) and staleness threshold (30 s). */
export const LOCK_RENEW_MS = 10_000;
export const LOCK_STALE_MS = 30_000;

export interface LockRecord {
  pid: number;
  pidNs: string;
  startTicks: string;
  token: string;
  acquiredAt: string;
}

export interface LockHolder {
  record: LockRecord | null;
  /** ms since the lease was last renewed */
  ageMs: number;
  alive: boolean;
}

function myPidNs(): string {
  try {
    return readlinkSync('/proc/self/ns/pid');
  } catch {
    return 'unknown';
  }
}

function startTicks(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return rest[19] ?? null; // field 22 overall
  } catch {
    return null;
  }
}

/** Reads the lock and tells whether its holder is alive; null when there is no lock. */
export async function inspectLock(file: string, staleMs = LOCK_STALE_MS): Promise<LockHolder | null> {
  let text: string;
  let mtimeMs: number;
  try {
    const st = await fs.stat(file);
    mtimeMs = st.mtimeMs;
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return null;
    throw err;
  }
  const ageMs = Math.max(0, Date.now() - mtimeMs);
  let record: LockRecord | null = null;
  try {
    const r = JSON.parse(text) as LockRecord;
    if (typeof r.pid === 'number' && typeof r.token === 'string') record = r;
  } catch {
    record = null;
  }
  let alive: boolean;
  if (record && record.pidNs === myPidNs() && record.pidNs !== 'unknown') {
    alive = startTicks(record.pid) === record.startTicks;
  } else {
    alive = ageMs < staleMs;
  }
  return { record, ageMs, alive };
}

/** Describes a holder for error messages. */
export function describeHolder(h: LockHolder): string {
  const who = h.record ? `pid ${h.record.pid} since ${h.record.acquiredAt}` : 'an unknown process';
  return `${who}, lease renewed ${Math.round(h.ageMs / 1000)} s ago`;
}

/** A held pool lock. `release()` is idempotent. */
export class PoolLock {
  private timer: NodeJS.Timeout | undefined;
  private released = false;

  private constructor(
    readonly file: string,
    readonly record: LockRecord,
    renewMs: number,
  ) {
    if (renewMs > 0) {
      this.timer = setInterval(() => {
        const now = new Date();
        fs.utimes(this.file, now, now).catch(() => undefined); // a lost renewal only shortens the lease
      }, renewMs);
      this.timer.unref();
    }
  }

  /**
   * Takes the lock or throws FailedPrecondition naming the live holder
   * (`purpose` says what the caller wanted to do, for the message).
   */
  static async acquire(file: string, purpose: string, opts: { renewMs?: number; staleMs?: number } = {}): Promise<PoolLock> {
    const record: LockRecord = {
      pid: process.pid,
      pidNs: myPidNs(),
      startTicks: startTicks(process.pid) ?? '',
      token: randomBytes(8).toString('hex'),
      acquiredAt: new Date().toISOString(),
    };
    const tmp = `${file}.${record.token}`;
    await fs.writeFile(tmp, JSON.stringify(record) + '\n', { mode: 0o644 });
    try {
      for (let attempt = 0; attempt < 3; attempt++) {
        try {
          await fs.link(tmp, file);
          return new PoolLock(file, record, opts.renewMs ?? LOCK_RENEW_MS);
        } catch (err) {
          if (errnoCode(err) !== 'EEXIST') throw err;
        }
        const holder = await inspectLock(file, opts.staleMs);
        if (holder?.alive) {
          throw failedPrecondition(
            `cannot ${purpose}: the pool is in use by another gear process (${describeHolder(holder)}; lock ${file})`,
          );
        }
        await fs.rm(file, { force: true }); // dead holder: take over
      }
      throw failedPrecondition(`cannot ${purpose}: could not take the pool lock ${file} (contended)`);
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    if (this.timer) clearInterval(this.timer);
    try {
      const cur = JSON.parse(await fs.readFile(this.file, 'utf8')) as LockRecord;
      if (cur.token === this.record.token) await fs.rm(this.file, { force: true });
    } catch {
      // gone or replaced: nothing of ours to remove
    }
  }
}
