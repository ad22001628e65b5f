/**
 * The miss filesystem's mount point: running mount(8)/umount(8)/stat(1) as
 * bounded child processes (a hung FUSE mount must block a child, never this
 * process), reading the mount table, and replacing a stale mount left by a
 * daemon that died.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import type { Logger } from 'pino';
import { describeError, failedPrecondition, internal } from '../errors.js';

export interface CmdResult {
  code: number | null;
  stderr: string;
  timedOut: boolean;
}

export function runCmd(cmd: string, args: string[], timeoutMs: number, extraFd?: number): Promise<CmdResult> {
  return new Promise((resolve) => {
    let child;
    try {
      child = spawn(cmd, args, {
        stdio: extraFd === undefined ? ['ignore', 'ignore', 'pipe'] : ['ignore', 'ignore', 'pipe', extraFd],
      });
    } catch (err) {
      resolve({ code: null, stderr: describeError(err), timedOut: false });
      return;
    }
    let stderr = '';
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      if (stderr.length < 4096) stderr += s;
    });
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: null, stderr: describeError(err), timedOut });
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr: stderr.trim(), timedOut });
    });
  });
}

export interface MountLine {
  id: number;
  dev: string;
  mountPoint: string;
  fsType: string;
}

function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Mounts at exactly mp, in mount-table order (the last one is on top). */
export function mountsAt(mp: string): MountLine[] {
  const out: MountLine[] = [];
  let text: string;
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return out;
  }
  for (const line of text.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    if (left.length < 6 || right.length < 1) continue;
    const mountPoint = unescapeMountinfo(left[4]!);
    if (mountPoint !== mp) continue;
    out.push({ id: Number(left[0]), dev: left[2]!, mountPoint, fsType: right[0]! });
  }
  return out;
}

/**
 * Makes mp ready for a fresh mount: a stale fuse.gear mount left by a crashed
 * daemon (its connection is gone: stat gives ENOTCONN) is lazily unmounted. A
 * live one, or any other filesystem mounted there, is an error.
 */
export async function prepareMountpoint(mp: string, logger: Logger): Promise<void> {
  for (let round = 0; round < 8; round++) {
    const top = mountsAt(mp).at(-1);
    if (!top) break;
    if (!top.fsType.startsWith('fuse')) {
      throw failedPrecondition(`miss filesystem mountpoint ${mp} already has a ${top.fsType} mount`);
    }
    // stat in a child process: a hung daemon would block the caller in the kernel, and must not block us.
    const probe = await runCmd('stat', ['-c', '%i', mp], 5_000);
    if (probe.code === 0) {
      throw failedPrecondition(
        `miss filesystem mountpoint ${mp} already has a live ${top.fsType} mount (another gear daemon running?)`,
      );
    }
    logger.warn(
      { mountpoint: mp, fsType: top.fsType, probe: probe.timedOut ? 'timed out' : probe.stderr },
      'missfs: replacing a stale FUSE mount left by a previous daemon',
    );
    const r = await runCmd('umount', ['-l', mp], 10_000);
    if (r.code !== 0) throw internal(`cannot unmount the stale mount at ${mp}: ${r.stderr}`);
  }
  if (mountsAt(mp).length > 0 && mountsAt(mp).at(-1)!.fsType.startsWith('fuse')) {
    throw internal(`stale FUSE mounts at ${mp} keep reappearing`);
  }
  mkdirSync(mp, { recursive: true });
}
