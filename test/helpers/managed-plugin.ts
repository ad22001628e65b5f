/**
 * A private dockerd for managed-plugin tests: unlike startDockerd() it starts
 * on the default driver, so a managed plugin can be created, set and enabled
 * first, and then restarts on the same data root with other arguments
 * (`--experimental -s <plugin>`). Managed plugins live under
 * `<data-root>/plugins`, so they stay private to this dockerd; their socket dirs
 * are /run/docker/plugins/<id> (fixed by dockerd), removed here for the ids this
 * dockerd created if dockerd left them.
 *
 * Everything else follows dockerd.ts: one /tmp/gp-XXXXXX dir, its own exec
 * root, socket and pidfile, bounded waits, only our own PIDs are signalled.
 */
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { DOCKER_BIN, DOCKERD_BIN, REPO_ROOT, type Dockerd, type DockerOptions } from './dockerd.js';
import { pidsReferencing, run, runOk, spawnLogged, stopChild, stopPid, tailFile, unmountUnder, waitFor, type RunResult } from './proc.js';

export const PLUGIN_BUILD = join(REPO_ROOT, 'plugin/build.sh');

export interface PrivateDockerd extends Dockerd {
  /** Arguments of the running dockerd beyond the private paths. */
  args: string[];
  /** Stops dockerd (its plugins stop with it) and starts it again on the same data root with these arguments. */
  restartWith(args: string[]): Promise<void>;
  /** Stops dockerd only (the state stays); restartWith() starts it again. */
  stopDockerd(): Promise<void>;
  /** PID of the running dockerd. */
  pid(): number | undefined;
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

export async function startPrivateDockerd(opts: { args?: string[]; startTimeoutMs?: number; verbose?: boolean } = {}): Promise<PrivateDockerd> {
  const startTimeoutMs = opts.startTimeoutMs ?? 60_000;
  const say = (m: string) => {
    if (opts.verbose) process.stderr.write(`[managed-plugin] ${m}\n`);
  };
  const dir = mkdtempSync('/tmp/gp-');
  const dataRoot = join(dir, 'data');
  const execRoot = join(dir, 'exec');
  const sock = join(dir, 'd.sock');
  const pidfile = join(dir, 'd.pid');
  const clientConfig = join(dir, 'client');
  for (const d of [dataRoot, execRoot, clientConfig]) mkdirSync(d, { recursive: true });
  const logs = { dockerd: join(dir, 'dockerd.log') };
  let proc: ChildProcess | undefined;
  let stopped = false;
  const pluginIds = new Set<string>();

  const logTail = (lines = 40): string => `--- ${logs.dockerd} (tail) ---\n${tailFile(logs.dockerd, lines)}\n`;
  const clientEnv = (): NodeJS.ProcessEnv => ({
    ...process.env,
    DOCKER_HOST: `unix://${sock}`,
    DOCKER_CONFIG: clientConfig,
    DOCKER_BUILDKIT: '0',
    DOCKER_CLI_HINTS: 'false',
  });
  const docker = (args: string[], o: DockerOptions = {}): Promise<RunResult> =>
    run(DOCKER_BIN, ['-H', `unix://${sock}`, ...args], {
      input: o.input,
      timeoutMs: o.timeoutMs ?? 300_000,
      cwd: o.cwd,
      env: { ...clientEnv(), ...(o.env ?? {}) },
    });

  const rememberPlugins = () => {
    try {
      for (const id of readdirSync(join(dataRoot, 'plugins'))) if (/^[0-9a-f]{64}$/.test(id)) pluginIds.add(id);
    } catch {
      /* none yet */
    }
  };

  async function startProc(args: string[]): Promise<void> {
    rmSync(pidfile, { force: true });
    const full = [
      '--data-root', dataRoot,
      '--exec-root', execRoot,
      '-H', `unix://${sock}`,
      '--pidfile', pidfile,
      '--bridge=none',
      '--iptables=false',
      '--ip6tables=false',
      '--ip-masq=false',
      '--userland-proxy=false',
      ...args,
    ];
    say(`starting dockerd ${full.join(' ')}`);
    proc = spawnLogged(DOCKERD_BIN, full, logs.dockerd);
    const p = proc;
    let ready = false;
    // Enabled plugins are started (and dialled, up to ~10 s) before the API answers.
    await waitFor(async () => p.exitCode !== null || p.signalCode !== null || (ready = await ping(sock)), Math.max(startTimeoutMs, 45_000), 250);
    if (!ready) {
      const why = p.exitCode !== null ? `exited with code ${p.exitCode}` : `no answer on ${sock}`;
      throw new Error(`dockerd ${args.join(' ')} failed to start (${why})\n${logTail()}`);
    }
    inst.args = args;
  }

  async function stopProc(): Promise<void> {
    rememberPlugins();
    if (proc) {
      say(`dockerd stop: ${await stopChild(proc, 60_000)}`);
      proc = undefined;
    }
    // What dockerd left (should be nothing): plugin daemons, then its containerd and shims.
    for (const pid of pluginPids(inst)) {
      say(`reaping leftover plugin pid ${pid}`);
      await stopPid(pid, 10_000);
    }
    for (const pid of pidsReferencing(dir)) {
      say(`reaping leftover pid ${pid}`);
      await stopPid(pid, 10_000);
    }
  }

  const inst: PrivateDockerd = {
    driver: 'gear',
    storageDriver: '',
    dir,
    sock,
    host: `unix://${sock}`,
    dataRoot,
    execRoot,
    logs,
    args: [],
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
    pid: () => proc?.pid,
    async restart() {
      await stopProc();
      await startProc(inst.args);
    },
    async restartWith(args) {
      await stopProc();
      const s = args.indexOf('-s');
      inst.storageDriver = s >= 0 ? (args[s + 1] ?? '') : '';
      await startProc(args);
    },
    stopDockerd: stopProc,
    async stop() {
      if (stopped) return;
      stopped = true;
      try {
        await stopProc();
        for (const pid of pidsReferencing(dir)) await stopPid(pid, 5_000);
      } finally {
        const left = await unmountUnder(dir);
        if (left.length) say(`unmounted leftovers: ${left.join(', ')}`);
        for (const id of pluginIds) {
          const p = join('/run/docker/plugins', id);
          if (existsSync(p)) {
            await unmountUnder(p);
            rmSync(p, { recursive: true, force: true });
          }
        }
        if (process.env.GEAR_TEST_KEEP_DIR) process.stderr.write(`[managed-plugin] keeping ${dir}\n`);
        else {
          try {
            rmSync(dir, { recursive: true, force: true, maxRetries: 3 });
          } catch (e) {
            process.stderr.write(`[managed-plugin] could not remove ${dir}: ${String(e)}\n`);
          }
        }
      }
    },
  };

  try {
    await startProc(opts.args ?? []);
  } catch (e) {
    await inst.stop();
    throw e;
  }
  return inst;
}

/**
 * PIDs of the Gear plugin daemons run by a private dockerd: children of its
 * containerd shims (which name its exec root) running /opt/gear/dist/cli/gear.js.
 * (The plugin's own cwd and root are inside its rootfs, so it names no host path.)
 */
export function pluginPids(d: Dockerd): number[] {
  const shims = new Set(pidsReferencing(d.dir));
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (shims.has(ppid) && readFileSync(`/proc/${e}/cmdline`, 'utf8').includes('/opt/gear/dist/cli/gear.js')) out.push(Number(e));
    } catch {
      /* raced with exit */
    }
  }
  return out;
}

/** Builds the plugin bundle (config.json + rootfs/) into outDir with plugin/build.sh --no-create. */
export async function buildBundle(outDir: string): Promise<string> {
  const r = await runOk('bash', [PLUGIN_BUILD, '--no-create', '--out', outDir], { timeoutMs: 300_000 });
  return r.stderr;
}

/** `docker plugin inspect` of one plugin as JSON. */
export async function inspectPlugin(d: Dockerd, name: string): Promise<{ Id: string; Enabled: boolean; Settings: { Env: string[]; Mounts: { Name: string; Source: string }[] }; Config: Record<string, unknown> }> {
  const r = await d.dockerOk(['plugin', 'inspect', name]);
  const list = JSON.parse(r.stdout) as unknown[];
  return list[0] as never;
}

/** The driver's Status lines of `docker info`, as a map. */
export async function driverStatus(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  return Object.fromEntries((JSON.parse(r.stdout) as [string, string][] | null) ?? []);
}
