/**
 * A private dockerd 28.5 (Debian unstable's docker.io, from the cache tree of
 * scripts/install-unstable.sh) with the containerd image store
 * (`"features": {"containerd-snapshotter": true}`) and `"storage-driver": "gear"`,
 * over a private containerd 2.1 whose proxy snapshotter `gear` is a
 * `gear snapshotter` (test/helpers/containerd.ts, config version 3).
 *
 * What dockerd 28 needs here:
 * - `--containerd <socket>` of that containerd (it then starts none of its
 *   own); it keeps its images, containers and leases in the containerd
 *   namespace `moby` (--containerd-namespace, the default) and its plugins in
 *   `plugins.moby`;
 * - daemon.json: `features.containerd-snapshotter` true and `storage-driver`
 *   "gear" = the name of the proxy plugin in containerd's config (dockerd then
 *   reports "Storage Driver: gear, driver-type: io.containerd.snapshotter.v1");
 * - the shim is started by containerd (containerd-shim-runc-v2 from the
 *   containerd 2.1 tree, found through containerd's PATH), runc by the shim
 *   (Debian 12's /usr/sbin/runc, also through PATH: dockerd passes the runtime
 *   name "runc");
 * - docker-init (for `docker run --init`): unstable's usr/bin/docker-init is a
 *   symlink to tini-static, which that tree lacks, so dockerd's PATH goes on to
 *   /usr/bin, where Debian 12's tini package has docker-init -> tini-static;
 * - its own --data-root, --exec-root, -H unix://…, --pidfile, and no
 *   networking of its own (--bridge=none --iptables=false --ip-masq=false).
 *
 * Everything lives under one short temp dir (/tmp/gd28-XXXXXX) plus the
 * containerd helper's dir; stop() stops dockerd, then containerd, its shims and
 * gear (by PID), unmounts what is left and removes both dirs. Never touches
 * /var/lib/docker, /run/containerd or a default socket.
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { RUNC, UNSTABLE_ROOT, containerd21Missing, startGearContainerd, type GearContainerd, type GearContainerdOptions } from './containerd.js';
import { pidsReferencing, run, spawnLogged, stopChild, stopPid, tailFile, unmountUnder, waitFor, type RunResult } from './proc.js';
import type { DockerOptions } from './dockerd.js';

export const DOCKERD28_BIN = join(UNSTABLE_ROOT, 'usr/sbin/dockerd');
export const DOCKER28_BIN = join(UNSTABLE_ROOT, 'usr/bin/docker');
/** The containerd namespace dockerd keeps its images and containers in. */
export const DOCKER28_NAMESPACE = 'moby';

/** PATH for dockerd 28: the unstable tree first (docker-proxy, the 28 client), then the system's (runc, docker-init). */
export function dockerd28Path(): string {
  return `${join(UNSTABLE_ROOT, 'usr/bin')}:${join(UNSTABLE_ROOT, 'usr/sbin')}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`;
}

/** Why dockerd 28 + containerd 2.1 cannot run here, or undefined when they can. */
export function docker28Missing(): string | undefined {
  for (const f of [DOCKERD28_BIN, DOCKER28_BIN]) {
    if (!existsSync(f)) return `${f} is missing (run make unstable-deps: scripts/install-unstable.sh)`;
  }
  return containerd21Missing() ?? (existsSync(RUNC) ? undefined : `${RUNC} is missing (apt-get install runc)`);
}

export interface Dockerd28Options {
  /** Options of the private containerd 2.1 + gear started for it (containerd is forced to '2.1'). */
  containerd?: Omit<GearContainerdOptions, 'containerd'>;
  /** Extra daemon.json keys (merged over the defaults). */
  daemonJson?: Record<string, unknown>;
  /** Extra dockerd arguments. */
  dockerdArgs?: string[];
  /** Print progress lines to stderr. */
  verbose?: boolean;
}

export interface Dockerd28 {
  /** Temp dir of dockerd (data, exec, socket, pidfile, daemon.json, log). */
  dir: string;
  sock: string;
  host: string;
  dataRoot: string;
  execRoot: string;
  daemonJsonFile: string;
  /** The containerd 2.1 + gear snapshotter underneath (its ctr() uses namespace moby). */
  containerd: GearContainerd;
  logs: { dockerd: string; containerd: string; gear: string };
  /** Runs the docker 28 client against this dockerd; never throws for a non-zero exit. */
  docker(args: string[], opts?: DockerOptions): Promise<RunResult>;
  /** Like docker() but throws (with stderr and log tails) when the command fails. */
  dockerOk(args: string[], opts?: DockerOptions): Promise<RunResult>;
  clientEnv(): NodeJS.ProcessEnv;
  /** Stops dockerd (SIGTERM, bounded) and starts it again on the same state. */
  restartDockerd(): Promise<void>;
  stopDockerd(): Promise<void>;
  startDockerd(): Promise<void>;
  /** PID of the running dockerd. */
  dockerdPid(): number | undefined;
  logTail(lines?: number): string;
  /** Stops everything (dockerd, containerd, shims, gear), unmounts, removes the dirs. Idempotent. */
  stop(): Promise<void>;
}

function ping(sock: string): Promise<boolean> {
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

export async function startDockerd28(opts: Dockerd28Options = {}): Promise<Dockerd28> {
  const missing = docker28Missing();
  if (missing) throw new Error(`dockerd 28: ${missing}`);
  const say = (m: string) => {
    if (opts.verbose) process.stderr.write(`[dockerd28] ${m}\n`);
  };
  const containerd = await startGearContainerd({ namespace: DOCKER28_NAMESPACE, ...opts.containerd, containerd: '2.1' });
  const dir = mkdtempSync('/tmp/gd28-');
  const dataRoot = join(dir, 'data');
  const execRoot = join(dir, 'exec');
  const sock = join(dir, 'd.sock');
  const pidfile = join(dir, 'd.pid');
  const clientConfig = join(dir, 'client');
  const daemonJsonFile = join(dir, 'daemon.json');
  for (const d of [dataRoot, execRoot, clientConfig]) mkdirSync(d, { recursive: true });
  const logs = { dockerd: join(dir, 'dockerd.log'), containerd: containerd.logs.containerd, gear: containerd.logs.gear };
  writeFileSync(
    daemonJsonFile,
    JSON.stringify({ features: { 'containerd-snapshotter': true }, 'storage-driver': 'gear', ...(opts.daemonJson ?? {}) }, null, 2) + '\n',
  );

  let dockerd: ChildProcess | undefined;
  let stopped = false;
  const running = (p: ChildProcess | undefined): p is ChildProcess => !!p && p.exitCode === null && p.signalCode === null;

  const logTail = (lines = 40): string =>
    `--- ${logs.dockerd} (tail) ---\n${tailFile(logs.dockerd, lines)}\n` +
    `--- ${logs.containerd} (tail) ---\n${tailFile(logs.containerd, lines)}\n` +
    `--- ${logs.gear} (tail) ---\n${tailFile(logs.gear, lines)}\n`;

  const clientEnv = (): NodeJS.ProcessEnv => ({
    ...process.env,
    PATH: dockerd28Path(),
    DOCKER_HOST: `unix://${sock}`,
    DOCKER_CONFIG: clientConfig,
    DOCKER_CLI_HINTS: 'false',
  });

  async function startDockerd(): Promise<void> {
    if (running(dockerd)) throw new Error('startDockerd: dockerd is running');
    rmSync(pidfile, { force: true });
    const args = [
      '--config-file', daemonJsonFile,
      '--containerd', containerd.ctrdSocket,
      '--containerd-namespace', DOCKER28_NAMESPACE,
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
    dockerd = spawnLogged(DOCKERD28_BIN, args, logs.dockerd, { ...process.env, PATH: dockerd28Path() });
    const d = dockerd;
    let ready = false;
    await waitFor(async () => !running(d) || (ready = await ping(sock)), 60_000, 250);
    if (!ready) {
      const why = d.exitCode === null && d.signalCode === null ? `no answer on ${sock}` : `exited with ${d.exitCode ?? d.signalCode}`;
      throw new Error(`dockerd 28 failed to start (${why})\n${logTail()}`);
    }
    say(`dockerd up on ${sock}`);
  }

  async function stopDockerd(): Promise<void> {
    if (dockerd) say(`dockerd stop: ${await stopChild(dockerd, 60_000)}`);
    dockerd = undefined;
  }

  const docker = (args: string[], o: DockerOptions = {}): Promise<RunResult> =>
    run(DOCKER28_BIN, ['-H', `unix://${sock}`, ...args], {
      input: o.input,
      timeoutMs: o.timeoutMs ?? 300_000,
      cwd: o.cwd,
      env: { ...clientEnv(), ...(o.env ?? {}) },
    });

  const inst: Dockerd28 = {
    dir,
    sock,
    host: `unix://${sock}`,
    dataRoot,
    execRoot,
    daemonJsonFile,
    containerd,
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
    async restartDockerd() {
      await stopDockerd();
      await startDockerd();
    },
    stopDockerd,
    startDockerd,
    dockerdPid: () => (running(dockerd) ? dockerd.pid : undefined),
    logTail,
    async stop() {
      if (stopped) return;
      stopped = true;
      try {
        await stopDockerd();
        for (const pid of pidsReferencing(dir)) await stopPid(pid, 5_000);
        // Tasks dockerd left (e.g. it was killed): SIGKILL them through containerd, or their
        // processes would outlive their shims.
        if (containerd.pids().containerd) {
          const ls = await containerd.ctr(['task', 'ls', '-q'], 20_000);
          for (const t of ls.stdout.split('\n').filter(Boolean)) {
            await containerd.ctr(['task', 'kill', '-s', 'KILL', t], 20_000);
            await waitFor(async () => (await containerd.ctr(['task', 'rm', '-f', t], 20_000)).code === 0, 20_000, 250);
          }
        }
      } finally {
        // containerd, the shims (they name containerd's socket), container mounts, then gear.
        await containerd.stop();
        await unmountUnder(dir);
        if (process.env.GEAR_TEST_KEEP_DIR) process.stderr.write(`[dockerd28] keeping ${dir}\n`);
        else rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
      }
    },
  };

  try {
    await startDockerd();
  } catch (e) {
    await inst.stop();
    throw e;
  }
  return inst;
}
