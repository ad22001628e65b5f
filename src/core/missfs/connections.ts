/**
 * The FUSE connections of this process's miss filesystems, and how to end
 * them when the process must go.
 *
 * A mounted session has a reader thread blocked in read(2) on /dev/fuse.
 * Nothing in the process can interrupt that read: Worker.terminate() does not,
 * and process.exit() joins every worker first, so a process that exits with a
 * session still mounted hangs forever, keeping its socket, its mount and every
 * caller blocked on the mount. Only the kernel can end the read: abort the
 * connection (fusectl, /sys/fs/fuse/connections/<N>/abort) or end the mount.
 * Aborting also fails every request in flight (callers get ECONNABORTED) and
 * every later access (ENOTCONN) until the next daemon replaces the mount.
 *
 * The sessions register themselves here while their reader runs, so that a
 * fatal path (cli/service.ts) can abort them all without knowing who mounted
 * what, then exit.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { describeError } from '../errors.js';
import { runCmd } from './mountpoint.js';

export const FUSECTL_DIR = '/sys/fs/fuse/connections';

/** What the registry needs of a mounted session. */
export interface LiveSession {
  readonly mountpoint: string;
  /** The FUSE connection number, when known. */
  readonly connection: number | undefined;
}

const live = new Set<LiveSession>();
let changed: Array<() => void> = [];

/** Records s as having a reader thread on /dev/fuse. Returns the function that removes it (when the reader has exited). */
export function registerSession(s: LiveSession): () => void {
  live.add(s);
  return () => {
    if (!live.delete(s)) return;
    const waiters = changed;
    changed = [];
    for (const w of waiters) w();
  };
}

/** Sessions of this process whose reader thread has not exited. */
export function liveSessions(): LiveSession[] {
  return [...live];
}

/** True when fusectl shows nothing (not mounted here): mount it, so that connections can be aborted. */
function fusectlMissing(abortFile: string): boolean {
  if (existsSync(abortFile)) return false;
  try {
    return existsSync(FUSECTL_DIR) && readdirSync(FUSECTL_DIR).length === 0;
  } catch {
    return false;
  }
}

function writeAbort(abortFile: string, conn: number, logger: Logger): boolean {
  try {
    writeFileSync(abortFile, '1');
    return true;
  } catch (err) {
    logger.warn({ err: describeError(err), conn }, 'missfs: cannot abort FUSE connection');
    return false;
  }
}

/** Aborts a FUSE connection through fusectl (mounting fusectl if needed). True when the abort was written. */
export async function abortConnection(conn: number, logger: Logger): Promise<boolean> {
  const abortFile = `${FUSECTL_DIR}/${conn}/abort`;
  if (fusectlMissing(abortFile)) {
    const r = await runCmd('mount', ['-t', 'fusectl', 'fusectl', FUSECTL_DIR], 5_000);
    if (r.code !== 0) logger.warn({ stderr: r.stderr }, 'missfs: cannot mount fusectl to abort a connection');
  }
  return writeAbort(abortFile, conn, logger);
}

/** abortConnection() without the event loop (for a process that may not get another turn). */
export function abortConnectionSync(conn: number, logger: Logger): boolean {
  const abortFile = `${FUSECTL_DIR}/${conn}/abort`;
  if (fusectlMissing(abortFile)) {
    const r = spawnSync('mount', ['-t', 'fusectl', 'fusectl', FUSECTL_DIR], { timeout: 3_000, stdio: 'ignore' });
    if (r.status !== 0) logger.warn({ status: r.status, error: r.error?.message }, 'missfs: cannot mount fusectl to abort a connection');
  }
  return writeAbort(abortFile, conn, logger);
}

/**
 * Ends every live session of this process at once, for a process that must
 * exit now: aborts each connection (synchronously, so it is done even if the
 * event loop never turns again), or, without a connection number, detaches
 * the mount lazily (which ends the session only if no overlay uses it).
 * Resolves true once every reader thread has exited, false after timeoutMs.
 */
export async function abortAllSessions(logger: Logger, timeoutMs: number): Promise<boolean> {
  const sessions = liveSessions();
  for (const s of sessions) {
    const aborted = s.connection !== undefined && abortConnectionSync(s.connection, logger);
    if (!aborted) spawnSync('umount', ['-l', s.mountpoint], { timeout: 3_000, stdio: 'ignore' });
    logger.warn({ mountpoint: s.mountpoint, conn: s.connection, aborted }, 'missfs: connection aborted (the process is exiting)');
  }
  const deadline = Date.now() + timeoutMs;
  while (live.size > 0) {
    const left = deadline - Date.now();
    if (left <= 0) return false;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, Math.min(left, 100));
      changed.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }
  return true;
}
