/**
 * Process and mount helpers for the integration tests.
 *
 * Rules these helpers enforce: every wait is bounded, we only ever signal
 * processes we started (by PID), and cleanup unmounts only what lies under a
 * directory we created.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, readdirSync, readlinkSync, statSync } from 'node:fs';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
}

export interface RunOptions {
  input?: string | Buffer;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Called with each chunk of stderr (e.g. to show progress). */
  onStderr?: (chunk: string) => void;
  onStdout?: (chunk: string) => void;
}

/** Runs a command to completion (bounded by timeoutMs, default 120 s). Never throws for a non-zero exit. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stdout.on('data', (b: Buffer) => {
      out.push(b);
      opts.onStdout?.(b.toString());
    });
    child.stderr.on('data', (b: Buffer) => {
      err.push(b);
      opts.onStderr?.(b.toString());
    });
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        stdout: Buffer.concat(out).toString(),
        stderr: Buffer.concat(err).toString() + (timedOut ? `\n[killed after ${timeoutMs} ms timeout]` : ''),
        code,
        signal,
        timedOut,
      });
    });
    child.stdin.on('error', () => {
      /* the child may exit before reading its input */
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Like run() but throws with the command's output when it fails. */
export async function runOk(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(
      `command failed (code ${r.code}${r.signal ? ', ' + r.signal : ''}): ${cmd} ${args.join(' ')}\n` +
        `stdout: ${r.stdout.slice(-4000)}\nstderr: ${r.stderr.slice(-4000)}`,
    );
  }
  return r;
}

/** Starts a long-running process with stdout and stderr appended to logFile. */
export function spawnLogged(cmd: string, args: string[], logFile: string, env?: NodeJS.ProcessEnv): ChildProcess {
  const fd = openSync(logFile, 'a');
  try {
    const child = spawn(cmd, args, { env: env ?? process.env, stdio: ['ignore', fd, fd] });
    // Don't let an 'error' event (e.g. ENOENT) crash the test worker; callers see it as an early exit.
    child.on('error', () => {});
    return child;
  } finally {
    closeSync(fd);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers kill(0); treat it as gone.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** Waits (bounded) until check() is true; polls every intervalMs. Returns whether it became true. */
export async function waitFor(check: () => boolean | Promise<boolean>, timeoutMs: number, intervalMs = 200): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  for (let i = 0; i < 100_000; i++) {
    if (await check()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(intervalMs);
  }
  return false;
}

/**
 * Stops one process we started: SIGTERM, a bounded wait, then SIGKILL and another bounded wait.
 * Returns how it ended.
 */
export async function stopPid(pid: number, termTimeoutMs = 20_000): Promise<'exited' | 'killed' | 'gone' | 'stuck'> {
  if (!pidAlive(pid)) return 'gone';
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return 'gone';
  }
  if (await waitFor(() => !pidAlive(pid), termTimeoutMs, 100)) return 'exited';
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return 'gone';
  }
  return (await waitFor(() => !pidAlive(pid), 10_000, 100)) ? 'killed' : 'stuck';
}

/** Stops a child we spawned and waits (bounded) for its exit event. */
export async function stopChild(child: ChildProcess, termTimeoutMs = 20_000): Promise<string> {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return 'gone';
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const how = await stopPid(child.pid, termTimeoutMs);
  await Promise.race([exited, sleep(5_000)]);
  return how;
}

/**
 * PIDs (other than ours) whose command line or cwd mentions dir. Used after a daemon was stopped
 * to find what it left behind (its containerd, shims): all started by us under our unique
 * temp dir, so matching on that path never hits anything else.
 */
export function pidsReferencing(dir: string): number[] {
  const out: number[] = [];
  let entries: string[] = [];
  try {
    entries = readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    const pid = Number(e);
    if (pid === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (cmd.some((a) => a.includes(dir))) {
        out.push(pid);
        continue;
      }
      const cwd = readlinkSync(`/proc/${pid}/cwd`);
      if (cwd === dir || cwd.startsWith(dir + '/')) out.push(pid);
    } catch {
      /* raced with exit */
    }
  }
  return out;
}

function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Mount points at or below dir, deepest first. */
export function mountPointsUnder(dir: string): string[] {
  const prefix = dir.endsWith('/') ? dir : dir + '/';
  const text = readFileSync('/proc/self/mountinfo', 'utf8');
  const points: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length < 5) continue;
    const mp = unescapeMountinfo(f[4]!);
    if (mp === dir || mp.startsWith(prefix)) points.push(mp);
  }
  return points.sort((a, b) => b.split('/').length - a.split('/').length || b.length - a.length);
}

/** Lazily unmounts everything under dir, deepest first; repeats (bounded) for stacked mounts. */
export async function unmountUnder(dir: string): Promise<string[]> {
  const done: string[] = [];
  for (let round = 0; round < 10; round++) {
    const points = mountPointsUnder(dir);
    if (points.length === 0) break;
    for (const p of points) {
      const r = await run('umount', ['-l', p], { timeoutMs: 30_000 });
      if (r.code === 0) done.push(p);
    }
  }
  return done;
}

/** The last n lines of a file, or a note that it is missing. */
export function tailFile(file: string, n = 40): string {
  if (!existsSync(file)) return `(no ${file})`;
  try {
    const st = statSync(file);
    const text = readFileSync(file, 'utf8').slice(Math.max(0, st.size - 64_000));
    return text.split('\n').slice(-n).join('\n');
  } catch (e) {
    return `(cannot read ${file}: ${String(e)})`;
  }
}
