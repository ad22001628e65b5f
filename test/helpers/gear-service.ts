/**
 * A `gear daemon` or `gear snapshotter` process (from dist/) for tests that
 * drive it directly: its own root, socket and log under a temp dir, graph-
 * driver calls over the socket, start/kill/restart by PID, and cleanup that
 * unmounts only what lies under the root.
 *
 * ```ts
 * const g = await startGearService({ kind: 'daemon', env: { GEAR_TEST_FAULTS: 'fatal-on-sigusr2' } });
 * await g.call('Create', { ID: 'a', Parent: '' });
 * await g.applyDiff('a', '', tarBuffer);
 * await g.kill9(); await g.start();
 * await g.dispose();
 * ```
 */
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import net from 'node:net';
import { join } from 'node:path';
import { GEAR_CLI } from './dockerd.js';
import { pidAlive, sleep, spawnLogged, stopChild, tailFile, unmountUnder, waitFor } from './proc.js';

export interface GearServiceOptions {
  kind: 'daemon' | 'snapshotter';
  /** Extra CLI arguments. */
  args?: string[];
  /** Extra environment (added to the test's). */
  env?: NodeJS.ProcessEnv;
  /** Use this root instead of a fresh temp dir (not removed by dispose()). */
  root?: string;
  /** Bound on the socket answering after a start; default 60 s. */
  startTimeoutMs?: number;
}

export interface GearService {
  readonly dir: string;
  readonly root: string;
  readonly socket: string;
  readonly log: string;
  /** The running process, if any. */
  readonly child: ChildProcess | undefined;
  pid(): number | undefined;
  /** Starts the process (again) on the same root and socket; resolves when the socket accepts (ms from spawn). */
  start(opts?: { env?: NodeJS.ProcessEnv; args?: string[] }): Promise<number>;
  /** kill -9, then waits (bounded) until it is gone. */
  kill9(): Promise<void>;
  /** Resolves with how the process ended, or undefined if it is still alive after ms. */
  waitExit(ms: number): Promise<{ code: number | null; signal: NodeJS.Signals | null } | undefined>;
  /** POST /GraphDriver.<method> (daemon only); rejects on a transport error, returns the decoded JSON. */
  call(method: string, body?: unknown, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** POST /GraphDriver.ApplyDiff with a tar body. */
  applyDiff(id: string, parent: string, tar: Buffer, timeoutMs?: number): Promise<Record<string, unknown>>;
  /** True when something accepts a connection on the socket. */
  answers(): Promise<boolean>;
  logTail(n?: number): string;
  /** Stops the process (SIGTERM, then SIGKILL), unmounts everything under the root, removes the temp dir. */
  dispose(): Promise<void>;
}

export function socketAnswers(socket: string, timeoutMs = 1_000): Promise<boolean> {
  return new Promise((resolve) => {
    const c = net.connect(socket);
    const done = (v: boolean) => {
      c.destroy();
      resolve(v);
    };
    c.setTimeout(timeoutMs, () => done(false));
    c.once('connect', () => done(true));
    c.once('error', () => done(false));
  });
}

function post(socketPath: string, path: string, body: Buffer | string, timeoutMs: number): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method: 'POST', timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve(JSON.parse(text) as Record<string, unknown>);
        } catch {
          reject(new Error(`${path}: HTTP ${res.statusCode}, not JSON: ${text.slice(0, 300)}`));
        }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${path}: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end(body);
  });
}

export async function startGearService(opts: GearServiceOptions): Promise<GearService> {
  const dir = mkdtempSync('/tmp/gs-');
  const root = opts.root ?? join(dir, 'root');
  mkdirSync(root, { recursive: true });
  const socket = join(dir, 's.sock');
  const log = join(dir, 'gear.log');
  let child: ChildProcess | undefined;

  const svc: GearService = {
    dir,
    root,
    socket,
    log,
    get child() {
      return child;
    },
    pid: () => (child && child.exitCode === null && child.signalCode === null ? child.pid : undefined),
    async start(o = {}) {
      if (svc.pid() !== undefined) throw new Error('start: the gear process is already running');
      const args = [GEAR_CLI, opts.kind, '--socket', socket, '--root', root, ...(opts.args ?? []), ...(o.args ?? [])];
      const t0 = Date.now();
      const c = spawnLogged(process.execPath, args, log, { ...process.env, ...opts.env, ...o.env });
      child = c;
      const ok = await waitFor(
        async () => c.exitCode !== null || c.signalCode !== null || (existsSync(socket) && (await socketAnswers(socket))),
        opts.startTimeoutMs ?? 60_000,
        20,
      );
      if (!ok || c.exitCode !== null || c.signalCode !== null) {
        throw new Error(`gear ${opts.kind} did not start (exit ${c.exitCode ?? c.signalCode})\n${tailFile(log, 30)}`);
      }
      return Date.now() - t0;
    },
    async kill9() {
      const c = child;
      if (!c || c.pid === undefined || c.exitCode !== null || c.signalCode !== null) return;
      const gone = new Promise<void>((r) => c.once('exit', () => r()));
      c.kill('SIGKILL');
      await Promise.race([gone, sleep(10_000)]);
      if (pidAlive(c.pid)) throw new Error(`gear ${opts.kind} (pid ${c.pid}) survived SIGKILL for 10 s`);
    },
    async waitExit(ms) {
      const c = child;
      if (!c) return undefined;
      if (c.exitCode !== null || c.signalCode !== null) return { code: c.exitCode, signal: c.signalCode };
      return new Promise((resolve) => {
        const t = setTimeout(() => resolve(undefined), ms);
        c.once('exit', (code, signal) => {
          clearTimeout(t);
          resolve({ code, signal });
        });
      });
    },
    call: (method, body = {}, timeoutMs = 60_000) => post(socket, `/GraphDriver.${method}`, JSON.stringify(body), timeoutMs),
    applyDiff: (id, parent, tar, timeoutMs = 120_000) =>
      post(socket, `/GraphDriver.ApplyDiff?id=${id}&parent=${parent}`, tar, timeoutMs),
    answers: () => socketAnswers(socket),
    logTail: (n = 40) => tailFile(log, n),
    async dispose() {
      if (child) await stopChild(child, 15_000);
      // overlays and index images first, then the miss filesystem
      await unmountUnder(join(root, 'layers'));
      await unmountUnder(root);
      if (!opts.root) rmSync(dir, { recursive: true, force: true });
    },
  };
  await svc.start();
  return svc;
}

/**
 * The fuse.gear mount on top at mp (/proc/self/mountinfo): its mount id (new for every mount) and FUSE
 * connection (st_dev minor; the kernel reuses a number once its connection is gone).
 */
export function missMount(mp: string): { id: number; conn: number } | undefined {
  let found: { id: number; conn: number } | undefined;
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-');
    if (sep < 0 || f[4] !== mp || f[sep + 1] !== 'fuse.gear') continue;
    const m = /^0:(\d+)$/.exec(f[2] ?? '');
    if (m) found = { id: Number(f[0]), conn: Number(m[1]) };
  }
  return found;
}
