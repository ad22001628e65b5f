/**
 * Scratch directories of `gear convert` and `gear copy` (staged file
 * contents, a `docker save` tar, downloaded blobs), so that none outlives
 * the command that made it:
 *
 * - each holds `.owner` (the pid of the process using it) and is mode 0700;
 * - it is removed when the command ends, successfully or not, and on
 *   SIGINT/SIGTERM/SIGHUP (`removeScratchOnSignals`, installed by the CLI);
 * - a kill -9 cannot remove it: a keyed directory (the conversion stage,
 *   keyed by the source digest) is then taken over and reused by the rerun
 *   of the same conversion, and every command sweeps the directories of
 *   its kind whose owner is dead.
 */
import { renameSync, rmSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

const OWNER = '.owner';
/** Directories of this process, removed on a signal. */
const live = new Set<string>();

export interface Scratch {
  dir: string;
  /** True when the directory was left by a dead run and is reused. */
  reused: boolean;
  /** Removes the directory. Idempotent. */
  release(): Promise<void>;
}

function alive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The pid in dir/.owner; undefined when there is none (or it is unreadable). */
async function ownerOf(dir: string): Promise<number | undefined> {
  try {
    const n = Number((await readFile(join(dir, OWNER), 'utf8')).trim());
    return Number.isSafeInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}

async function writeOwner(dir: string): Promise<void> {
  const tmp = join(dir, `${OWNER}.tmp-${process.pid}`);
  await writeFile(tmp, `${process.pid}\n`);
  await rename(tmp, join(dir, OWNER));
}

/** A directory only this user can write into (so its contents are ours, not planted). */
async function private0700(dir: string): Promise<boolean> {
  try {
    const st = await lstat(dir);
    return st.isDirectory() && (process.getuid === undefined || st.uid === process.getuid()) && (st.mode & 0o077) === 0;
  } catch {
    return false;
  }
}

function track(dir: string, reused: boolean): Scratch {
  live.add(dir);
  return {
    dir,
    reused,
    async release() {
      live.delete(dir);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Removes `parent/<prefix>*` directories whose owner is dead. Directories
 * without an owner file (made by a gear before this scheme: `<prefix>` + 6
 * random characters) are removed when untouched for an hour.
 */
export async function sweepStale(parent: string, prefix: string, keep?: string): Promise<string[]> {
  const removed: string[] = [];
  let names: string[];
  try {
    names = await readdir(parent);
  } catch {
    return removed;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const dir = join(parent, name);
    if (dir === keep || live.has(dir) || !(await private0700(dir))) continue;
    const owner = await ownerOf(dir);
    let stale = owner !== undefined && owner !== process.pid && !alive(owner);
    if (owner === undefined && /^[A-Za-z0-9]{6}$/.test(name.slice(prefix.length))) {
      const st = await lstat(dir).catch(() => undefined);
      stale = st !== undefined && Date.now() - st.mtimeMs > 3_600_000;
    }
    if (stale) {
      await rm(dir, { recursive: true, force: true }).catch(() => undefined);
      removed.push(dir);
    }
  }
  return removed;
}

/**
 * A scratch directory `parent/<prefix><key>` (reused when a dead run left
 * it), or `parent/<prefix>XXXXXX` without a key or when a live process uses
 * the keyed one. Sweeps stale directories of the same prefix.
 */
export async function claimScratch(parent: string, prefix: string, key?: string): Promise<Scratch> {
  let claimed: Scratch | undefined;
  if (key !== undefined) {
    if (!/^[A-Za-z0-9._-]{1,80}$/.test(key)) throw new Error(`scratch key ${JSON.stringify(key)} is not a plain name`);
    const dir = join(parent, `${prefix}${key}`);
    try {
      await mkdir(dir, { mode: 0o700 });
      await writeOwner(dir);
      claimed = track(dir, false);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const owner = await ownerOf(dir);
      if ((owner === undefined || !alive(owner)) && (await private0700(dir))) {
        // Take over a dead run's directory: mkdir is atomic, so one process wins a race.
        const token = join(dir, `.takeover-${owner ?? 'none'}`);
        try {
          await mkdir(token);
          await writeOwner(dir);
          await rm(token, { recursive: true, force: true });
          claimed = track(dir, true);
        } catch {
          claimed = undefined;
        }
      }
    }
  }
  if (!claimed) {
    const dir = await mkdtemp(join(parent, prefix));
    await writeOwner(dir);
    claimed = track(dir, false);
  }
  await sweepStale(parent, prefix, claimed.dir);
  return claimed;
}

/**
 * Removes this process's scratch directories when it is interrupted
 * (SIGINT, SIGTERM, SIGHUP), then exits with 128 + the signal number.
 * For CLI commands; installed once.
 */
let installed = false;
export function removeScratchOnSignals(): void {
  if (installed) return;
  installed = true;
  const numbers: Record<string, number> = { SIGINT: 2, SIGTERM: 15, SIGHUP: 1 };
  for (const sig of Object.keys(numbers) as NodeJS.Signals[]) {
    process.once(sig, () => {
      // Writes still in flight in libuv's pool may add a file while the tree is removed (ENOTEMPTY). Renamed
      // first, the directory's old path is gone, so they can no longer create files in it; the rest is retried.
      for (const dir of live) {
        try {
          let doomed = dir;
          try {
            doomed = `${dir}.removing-${process.pid}`;
            renameSync(dir, doomed);
          } catch {
            doomed = dir;
          }
          rmSync(doomed, { recursive: true, force: true, maxRetries: 20, retryDelay: 25 });
        } catch (err) {
          process.stderr.write(`gear: could not remove ${dir}: ${(err as Error).message}\n`);
        }
      }
      live.clear();
      process.stderr.write(`gear: interrupted (${sig}); removed the scratch files\n`);
      process.exit(128 + numbers[sig]!);
    });
  }
}
