/**
 * A private dockerd for integration tests, on overlay2 or on Gear.
 *
 * Everything lives under one short temp dir (/tmp/gi-XXXXXX: unix socket paths
 * must stay under 108 bytes): data root, exec root (dockerd starts its own
 * containerd there), the API socket, the pidfile, the Gear root and the logs.
 * For driver 'gear' the Gear daemon is started first, serving the unmanaged
 * plugin socket /run/docker/plugins/<name>.sock with a unique name per run, and
 * stopped after dockerd. Never touches /var/lib/docker or the default socket.
 */
import { randomBytes } from 'node:crypto';
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  pidAlive,
  pidsReferencing,
  run,
  spawnLogged,
  stopChild,
  stopPid,
  tailFile,
  unmountUnder,
  waitFor,
  type RunResult,
} from './proc.js';

export const DOCKER_BIN = '/usr/bin/docker'; // the 20.10 client; /usr/local/bin/docker is a v28 client
export const DOCKERD_BIN = '/usr/sbin/dockerd';
export const PLUGIN_DIR = '/run/docker/plugins';
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const GEAR_CLI = join(REPO_ROOT, 'dist/cli/gear.js');

export type Driver = 'overlay2' | 'gear';

export interface DockerdOptions {
  driver: Driver;
  /** Extra dockerd arguments. */
  dockerdArgs?: string[];
  /** Extra `gear daemon` arguments. */
  gearArgs?: string[];
  /** Extra environment of the `gear daemon` (over this process's). */
  gearEnv?: NodeJS.ProcessEnv;
  /** Bounded wait for each daemon to come up (default 60 s). */
  startTimeoutMs?: number;
  /** Print progress lines to stderr. */
  verbose?: boolean;
}

export interface DockerOptions {
  input?: string | Buffer;
  /** Default 300 s. */
  timeoutMs?: number;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
}

export interface Dockerd {
  driver: Driver;
  /** The storage driver name passed to `dockerd -s`. */
  storageDriver: string;
  /** Temp dir holding everything of this instance. */
  dir: string;
  sock: string;
  host: string;
  dataRoot: string;
  execRoot: string;
  gearRoot?: string;
  pluginSocket?: string;
  logs: { dockerd: string; gear?: string };
  /** Runs /usr/bin/docker -H <sock> args; never throws for a non-zero exit. */
  docker(args: string[], opts?: DockerOptions): Promise<RunResult>;
  /** Like docker() but throws (with stderr and log tails) when the command fails. */
  dockerOk(args: string[], opts?: DockerOptions): Promise<RunResult>;
  /** Environment for running the docker client by hand (DOCKER_HOST etc.). */
  clientEnv(): NodeJS.ProcessEnv;
  /** Stops dockerd (and the Gear daemon when restartGear), then starts them again on the same state. */
  restart(opts?: { restartGear?: boolean }): Promise<void>;
  /** (startDockerd only) kill -9 of the Gear daemon this helper started (dockerd and containers keep running); waits for its exit. */
  killGear?(): Promise<void>;
  /** Starts the Gear daemon again on the same root and plugin socket (after killGear). */
  startGear?(): Promise<void>;
  /** PID of the running Gear daemon, if any. */
  gearPid?(): number | undefined;
  /** Stops everything it started, unmounts what is left under dir, removes dir. Idempotent. */
  stop(): Promise<void>;
  /** Last lines of the daemon logs, for failure messages. */
  logTail(lines?: number): string;
}

function pluginActivate(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request(
      {
        socketPath,
        path: '/Plugin.Activate',
        method: 'POST',
        headers: { Accept: 'application/vnd.docker.plugins.v1.2+json' },
        timeout: 3_000,
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => resolve(res.statusCode === 200 && body.includes('GraphDriver')));
        res.on('error', () => resolve(false));
      },
    );
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
    req.end('null');
  });
}

function dockerdPing(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ socketPath: sock, path: '/_ping', method: 'GET', timeout: 3_000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode === 200));
      res.on('error', () => resolve(false));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
    req.end();
  });
}

/** True when `gear daemon` is implemented in dist/ (has --socket in its help). */
export async function gearDaemonAvailable(): Promise<boolean> {
  if (!existsSync(GEAR_CLI)) return false;
  const r = await run(process.execPath, [GEAR_CLI, 'daemon', '--help'], { timeoutMs: 30_000 });
  return r.code === 0 && r.stdout.includes('--socket');
}

export async function startDockerd(opts: DockerdOptions): Promise<Dockerd> {
  const startTimeoutMs = opts.startTimeoutMs ?? 60_000;
  const say = (m: string) => {
    if (opts.verbose) process.stderr.write(`[dockerd-helper] ${m}\n`);
  };
  const dir = mkdtempSync('/tmp/gi-');
  const dataRoot = join(dir, 'data');
  const execRoot = join(dir, 'exec');
  const sock = join(dir, 'd.sock');
  const pidfile = join(dir, 'd.pid');
  const clientConfig = join(dir, 'client');
  for (const d of [dataRoot, execRoot, clientConfig]) mkdirSync(d, { recursive: true });
  const logs: { dockerd: string; gear?: string } = { dockerd: join(dir, 'dockerd.log') };

  let storageDriver = 'overlay2';
  let gearRoot: string | undefined;
  let pluginSocket: string | undefined;
  if (opts.driver === 'gear') {
    storageDriver = `gear-${randomBytes(4).toString('hex')}`;
    gearRoot = join(dir, 'gear');
    mkdirSync(gearRoot, { recursive: true });
    mkdirSync(PLUGIN_DIR, { recursive: true });
    pluginSocket = join(PLUGIN_DIR, `${storageDriver}.sock`);
    logs.gear = join(dir, 'gear.log');
  }

  let gear: ChildProcess | undefined;
  let dockerd: ChildProcess | undefined;
  let stopped = false;

  const logTail = (lines = 40): string => {
    let s = `--- ${logs.dockerd} (tail) ---\n${tailFile(logs.dockerd, lines)}\n`;
    if (logs.gear) s += `--- ${logs.gear} (tail) ---\n${tailFile(logs.gear, lines)}\n`;
    return s;
  };

  const clientEnv = (): NodeJS.ProcessEnv => ({
    ...process.env,
    DOCKER_HOST: `unix://${sock}`,
    DOCKER_CONFIG: clientConfig,
    DOCKER_BUILDKIT: '0',
    DOCKER_CLI_HINTS: 'false',
  });

  async function startGear(): Promise<void> {
    if (!gearRoot || !pluginSocket || !logs.gear) return;
    rmSync(pluginSocket, { force: true });
    const args = [GEAR_CLI, 'daemon', '--socket', pluginSocket, '--root', gearRoot, ...(opts.gearArgs ?? [])];
    say(`starting gear: node ${args.join(' ')}`);
    // GEAR_TEST_NODE_ARGS: extra node flags for the daemon (e.g. --cpu-prof --cpu-prof-dir=/tmp/prof).
    const nodeArgs = (process.env.GEAR_TEST_NODE_ARGS ?? '').split(' ').filter(Boolean);
    gear = spawnLogged(process.execPath, [...nodeArgs, ...args], logs.gear, opts.gearEnv ? { ...process.env, ...opts.gearEnv } : undefined);
    const g = gear;
    // Ends early when the daemon exits.
    let ready = false;
    await waitFor(
      async () => g.exitCode !== null || g.signalCode !== null || (ready = existsSync(pluginSocket!) && (await pluginActivate(pluginSocket!))),
      startTimeoutMs,
      200,
    );
    if (!ready) {
      const why = g.exitCode !== null ? `exited with code ${g.exitCode}` : `no answer on ${pluginSocket} within ${startTimeoutMs} ms`;
      throw new Error(`gear daemon failed to start (${why})\n${logTail()}`);
    }
  }

  async function startDockerdProc(): Promise<void> {
    rmSync(pidfile, { force: true });
    const args = [
      '--experimental',
      '-s', storageDriver,
      '--data-root', dataRoot,
      '--exec-root', execRoot,
      '-H', `unix://${sock}`,
      '--pidfile', pidfile,
      '--bridge=none',
      '--iptables=false',
      '--ip6tables=false',
      '--ip-masq=false',
      '--userland-proxy=false',
      ...(opts.dockerdArgs ?? []),
    ];
    say(`starting dockerd ${args.join(' ')}`);
    dockerd = spawnLogged(DOCKERD_BIN, args, logs.dockerd);
    const d = dockerd;
    // dockerd retries a missing plugin for up to 30 s, so allow at least that.
    let ready = false;
    await waitFor(
      async () => d.exitCode !== null || d.signalCode !== null || (ready = await dockerdPing(sock)),
      Math.max(startTimeoutMs, 45_000),
      250,
    );
    if (!ready) {
      const why = d.exitCode !== null ? `exited with code ${d.exitCode}` : `no answer on ${sock}`;
      throw new Error(`dockerd -s ${storageDriver} failed to start (${why})\n${logTail()}`);
    }
    say(`dockerd up on ${sock}`);
  }

  /** Stops dockerd and reaps what it left (its containerd and shims, all under our dir). */
  async function stopDockerdProc(): Promise<void> {
    if (dockerd) {
      const how = await stopChild(dockerd, 60_000);
      say(`dockerd stop: ${how}`);
      dockerd = undefined;
    }
    const keep = gear?.pid;
    for (const pid of pidsReferencing(dir)) {
      if (pid === keep) continue;
      say(`reaping leftover pid ${pid}`);
      await stopPid(pid, 10_000);
    }
  }

  async function stopGear(): Promise<void> {
    if (gear) {
      const how = await stopChild(gear, 30_000);
      say(`gear stop: ${how}`);
      gear = undefined;
    }
    if (pluginSocket) rmSync(pluginSocket, { force: true });
  }

  const docker = (args: string[], o: DockerOptions = {}): Promise<RunResult> =>
    run(DOCKER_BIN, ['-H', `unix://${sock}`, ...args], {
      input: o.input,
      timeoutMs: o.timeoutMs ?? 300_000,
      cwd: o.cwd,
      env: { ...clientEnv(), ...(o.env ?? {}) },
    });

  const inst: Dockerd = {
    driver: opts.driver,
    storageDriver,
    dir,
    sock,
    host: `unix://${sock}`,
    dataRoot,
    execRoot,
    gearRoot,
    pluginSocket,
    logs,
    docker,
    async dockerOk(args, o) {
      const r = await docker(args, o);
      if (r.code !== 0) {
        throw new Error(
          `docker ${args.join(' ')} failed (code ${r.code}${r.timedOut ? ', timed out' : ''})\n` +
            `stdout: ${r.stdout.slice(-3000)}\nstderr: ${r.stderr.slice(-3000)}\n${logTail(25)}`,
        );
      }
      return r;
    },
    clientEnv,
    logTail,
    async killGear() {
      const g = gear;
      if (!g || g.pid === undefined || g.exitCode !== null || g.signalCode !== null) throw new Error('killGear: the gear daemon is not running');
      const exited = new Promise<void>((r) => g.once('exit', () => r()));
      g.kill('SIGKILL');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      gear = undefined;
    },
    startGear,
    gearPid: () => (gear && gear.exitCode === null && gear.signalCode === null ? gear.pid : undefined),
    async restart(ro = {}) {
      await stopDockerdProc();
      if (ro.restartGear) {
        await stopGear();
        await startGear();
      }
      await startDockerdProc();
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      try {
        await stopDockerdProc();
        await stopGear();
        // Anything else still running from our dir (should be nothing).
        for (const pid of pidsReferencing(dir)) await stopPid(pid, 5_000);
      } finally {
        const left = await unmountUnder(dir);
        if (left.length) say(`unmounted leftovers: ${left.join(', ')}`);
        if (pluginSocket) rmSync(pluginSocket, { force: true });
        if (process.env.GEAR_TEST_KEEP_DIR) {
          process.stderr.write(`[dockerd-helper] keeping ${dir}\n`);
        } else {
          try {
            rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
          } catch (e) {
            process.stderr.write(`[dockerd-helper] could not remove ${dir}: ${String(e)}\n`);
          }
        }
      }
    },
  };

  try {
    await startGear();
    await startDockerdProc();
  } catch (e) {
    process.stderr.write(`[dockerd-helper] start failed:\n${e instanceof Error ? e.message : String(e)}\n`);
    await inst.stop();
    throw e;
  }
  return inst;
}

/** Convenience for tests: whether a pid from the pidfile is still alive. */
export function isAlive(pid: number): boolean {
  return pidAlive(pid);
}
