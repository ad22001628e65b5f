/**
 * Start a real CNCF distribution registry (Debian's `docker-registry`, 2.8)
 * for a test: 127.0.0.1 on a free port, its own storage under a temp dir,
 * deletes enabled, optional htpasswd auth. Stop it with `stop()` (by PID).
 *
 * ```ts
 * let reg: TestRegistry;
 * beforeAll(async () => { reg = await startRegistry({ htpasswd: true }); });
 * afterAll(async () => { await reg?.stop(); });
 * // reg.host = "127.0.0.1:PORT", reg.url = "http://127.0.0.1:PORT", reg.credentials = {username, password}
 * ```
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const REGISTRY_BINARY = process.env.GEAR_TEST_REGISTRY_BIN ?? '/usr/bin/docker-registry';

/** Fixed test account for htpasswd mode. The bcrypt hash (cost 4) is of TEST_PASSWORD. */
export const TEST_USERNAME = 'gear';
export const TEST_PASSWORD = 'gear-test-password';
const TEST_BCRYPT = '$2b$04$q9Q50jVES.me/k/DXivEg.aH6QXarVNx9NA87eBOsRWmG.cMO7Kj2';

export interface StartRegistryOptions {
  /** Require Basic auth (htpasswd) with TEST_USERNAME / TEST_PASSWORD. */
  htpasswd?: boolean;
  /** Milliseconds to wait for the registry to answer /v2/. Default 20 s. */
  startTimeoutMs?: number;
}

export interface TestRegistry {
  /** "127.0.0.1:PORT" – use as the registry part of references. */
  host: string;
  /** "http://127.0.0.1:PORT" */
  url: string;
  /** Temp dir holding config.yml, htpasswd and data/. Removed by stop(). */
  root: string;
  /** Credentials when started with htpasswd. */
  credentials?: { username: string; password: string };
  /** PID of the registry process. */
  pid: number;
  /** Stop the registry (SIGTERM, then SIGKILL after 5 s) and delete root. Idempotent. */
  stop(): Promise<void>;
  /** Everything the registry printed so far (capped at 1 MiB). */
  logs(): string;
}

/** A free TCP port on 127.0.0.1 (racy by nature; startRegistry retries on a bind failure). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

function configYaml(root: string, port: number, htpasswd: boolean): string {
  const lines = [
    'version: 0.1',
    'log:',
    '  level: info',
    '  accesslog:',
    '    disabled: true',
    'storage:',
    '  filesystem:',
    `    rootdirectory: ${join(root, 'data')}`,
    '  delete:',
    '    enabled: true',
    '  maintenance:',
    '    uploadpurging:',
    '      enabled: false',
    'http:',
    `  addr: 127.0.0.1:${port}`,
    `  secret: gear-test-secret-${port}`,
    '  draintimeout: 1s',
  ];
  if (htpasswd) {
    lines.push('auth:', '  htpasswd:', '    realm: gear-test', `    path: ${join(root, 'htpasswd')}`);
  }
  return lines.join('\n') + '\n';
}

async function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return true;
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once('exit', () => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

async function probe(url: string): Promise<number | undefined> {
  try {
    const res = await fetch(`${url}/v2/`, { signal: AbortSignal.timeout(1000) });
    await res.arrayBuffer();
    return res.status;
  } catch {
    return undefined;
  }
}

async function startOnce(root: string, opts: StartRegistryOptions): Promise<TestRegistry | undefined> {
  const port = await freePort();
  const cfg = join(root, 'config.yml');
  await writeFile(cfg, configYaml(root, port, !!opts.htpasswd));
  let out = '';
  const child = spawn(REGISTRY_BINARY, ['serve', cfg], { stdio: ['ignore', 'pipe', 'pipe'], env: { PATH: process.env.PATH ?? '' } });
  const append = (b: Buffer) => {
    if (out.length < 1 << 20) out += b.toString('utf8');
  };
  child.stdout!.on('data', append);
  child.stderr!.on('data', append);
  const spawned = await new Promise<boolean>((resolve) => {
    child.once('spawn', () => resolve(true));
    child.once('error', (err) => {
      out += String(err);
      resolve(false);
    });
  });
  if (!spawned || child.pid === undefined) throw new Error(`cannot start ${REGISTRY_BINARY}: ${out}`);
  const url = `http://127.0.0.1:${port}`;
  // If the test process exits without calling stop() (crash, worker teardown), do not leave the registry behind.
  const killOnExit = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  process.once('exit', killOnExit);
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    process.removeListener('exit', killOnExit);
    if (child.exitCode === null && child.signalCode === null) {
      process.kill(child.pid!, 'SIGTERM');
      if (!(await waitExit(child, 5000))) {
        process.kill(child.pid!, 'SIGKILL');
        await waitExit(child, 5000);
      }
    }
  };
  const deadline = Date.now() + (opts.startTimeoutMs ?? 20_000);
  for (let i = 0; i < 400 && Date.now() < deadline; i++) {
    if (child.exitCode !== null) break;
    const status = await probe(url);
    if (status === 200 || status === 401) {
      const reg: TestRegistry = {
        host: `127.0.0.1:${port}`,
        url,
        root,
        pid: child.pid,
        stop: async () => {
          await stop();
          await rm(root, { recursive: true, force: true });
        },
        logs: () => out,
      };
      if (opts.htpasswd) reg.credentials = { username: TEST_USERNAME, password: TEST_PASSWORD };
      return reg;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  await stop();
  if (/address already in use/.test(out)) return undefined; // lost the port race: try another
  throw new Error(`registry did not start on ${url}:\n${out.slice(-4000)}`);
}

export async function startRegistry(opts: StartRegistryOptions = {}): Promise<TestRegistry> {
  const root = await mkdtemp(join(tmpdir(), 'gear-registry-'));
  try {
    if (opts.htpasswd) await writeFile(join(root, 'htpasswd'), `${TEST_USERNAME}:${TEST_BCRYPT}\n`);
    for (let attempt = 0; attempt < 3; attempt++) {
      const reg = await startOnce(root, opts);
      if (reg) return reg;
    }
    throw new Error('registry: no free port after 3 attempts');
  } catch (err) {
    await rm(root, { recursive: true, force: true });
    throw err;
  }
}
