/**
 * A private containerd with `gear snapshotter` as its proxy snapshotter
 * `gear`, everything under one temp dir: containerd's root, state, sockets
 * and config.toml, gear's root and socket, and both logs. The machine's
 * default containerd is never touched.
 *
 * Two containerd versions:
 * - '1.6' (default): Debian 12's /usr/bin/containerd, config version 2, CRI off;
 * - '2.1': Debian unstable's containerd 2.1 from the cache tree that
 *   scripts/install-unstable.sh fills (UNSTABLE_ROOT), config version 3, with
 *   the CRI plugins and NRI off (NRI would listen on /var/run/nri). Its PATH
 *   starts with that tree's usr/bin, so containerd finds the 2.1
 *   containerd-shim-runc-v2 there; the shim then finds Debian 12's runc in
 *   /usr/sbin (unstable's runc needs a newer glibc).
 *
 * stop() kills the tasks it knows of through containerd, stops containerd,
 * the shims and anything else still running under the dir (by PID), unmounts
 * container roots before gear stops serving the miss filesystem, then gear,
 * then whatever is left, and removes the dir.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI } from './dockerd.js';
import { pidsReferencing, run, stopChild, stopPid, tailFile, unmountUnder, waitFor, type RunResult } from './proc.js';
import { UNSTABLE_ROOT } from './unstable.js';

export const CONTAINERD = '/usr/bin/containerd';
export const CTR = '/usr/bin/ctr';

/** The Debian-unstable tree of scripts/install-unstable.sh (docker.io 28.5, containerd 2.1). */
export { UNSTABLE_ROOT };
export const CONTAINERD21_BIN_DIR = join(UNSTABLE_ROOT, 'usr/bin');
export const CONTAINERD21 = join(CONTAINERD21_BIN_DIR, 'containerd');
export const CTR21 = join(CONTAINERD21_BIN_DIR, 'ctr');
export const SHIM21 = join(CONTAINERD21_BIN_DIR, 'containerd-shim-runc-v2');
/** Debian 12's runc, used with containerd 2.1 (unstable's runc does not run on Debian 12's glibc). */
export const RUNC = '/usr/sbin/runc';

export type ContainerdVersion = '1.6' | '2.1';

/** Why containerd 2.1 cannot run here (binaries missing), or undefined when it can. */
export function containerd21Missing(): string | undefined {
  for (const f of [CONTAINERD21, CTR21, SHIM21, RUNC]) {
    if (!existsSync(f)) return `${f} is missing (run make unstable-deps: scripts/install-unstable.sh)`;
  }
  return undefined;
}

/** PATH for containerd 2.1: its own bin dir first (the shim), then the system's (runc in /usr/sbin). */
export function containerd21Path(): string {
  return `${CONTAINERD21_BIN_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`;
}

export interface GearContainerdOptions {
  /** Which containerd: '1.6' (Debian 12, config version 2; default) or '2.1' (Debian unstable, config version 3). */
  containerd?: ContainerdVersion;
  /** Extra TOML appended to config.toml (in the config version of the chosen containerd). */
  extraConfig?: string;
  /**
   * Plugins to disable, replacing the default list (1.6: the CRI; 2.1: the three CRI plugins and
   * NRI). E.g. a CRI test on 2.1 passes ['io.containerd.nri.v1.nri'] and configures the CRI in extraConfig.
   */
  disabledPlugins?: string[];
  /**
   * 2.1 only: write the transfer service's unpack_config for overlayfs and gear (default true).
   * `ctr image pull/import` on containerd 2.x goes through the transfer service, which unpacks only
   * into the snapshotters listed there (default: overlayfs alone; `--snapshotter gear` then fails
   * with "no unpack platforms defined"). False when extraConfig writes its own
   * [plugins."io.containerd.transfer.v1.local"].
   */
  transferUnpack?: boolean;
  /** containerd namespace for ctr (default gear-test). */
  namespace?: string;
  /** Extra `gear snapshotter` arguments. */
  gearArgs?: string[];
  /** gear log level (default debug). */
  gearLogLevel?: string;
  /** Task ids to kill and remove in stop() if still there. */
  tasks?: string[];
}

export interface GearContainerd {
  /** The containerd version running. */
  version: ContainerdVersion;
  /** The containerd and ctr binaries used. */
  containerdBin: string;
  ctrBin: string;
  base: string;
  /** containerd's config.toml, logs. */
  configFile: string;
  logs: { containerd: string; gear: string };
  gearRoot: string;
  gearSocket: string;
  ctrdSocket: string;
  /** ctr against this containerd, in its namespace; never throws for a non-zero exit. */
  ctr(args: string[], timeoutMs?: number): Promise<RunResult>;
  /** Like ctr() but throws with the stderr and both log tails. */
  ctrOk(args: string[], timeoutMs?: number): Promise<string>;
  /** kill -9 of `gear snapshotter` (a crash); containerd and its tasks keep running. */
  killGear(): Promise<void>;
  /** SIGTERM of `gear snapshotter` (a clean stop, bounded; SIGKILL after 30 s); waits for its exit. */
  stopGear(): Promise<void>;
  /** Starts `gear snapshotter` again on the same root and socket. */
  startGear(): Promise<void>;
  /** SIGTERM of containerd alone (its shims and tasks keep running), waits for its exit. */
  stopContainerd(): Promise<void>;
  /** Starts containerd again on the same config (after stopContainerd). */
  startContainerd(): Promise<void>;
  /** stopContainerd() then startContainerd(). */
  restartContainerd(): Promise<void>;
  /** PIDs of containerd and gear when running. */
  pids(): { containerd?: number; gear?: number };
  stop(): Promise<void>;
}

function startLogged(cmd: string, args: string[], log: string, env?: NodeJS.ProcessEnv): ChildProcess {
  const fd = openSync(log, 'a');
  try {
    const child = spawn(cmd, args, { stdio: ['ignore', fd, fd], env: env ?? process.env });
    child.on('error', () => {}); // seen as an early exit by the waits
    return child;
  } finally {
    closeSync(fd);
  }
}

const running = (p: ChildProcess | undefined): p is ChildProcess => !!p && p.exitCode === null && p.signalCode === null;

/** config.toml for containerd 1.6 (version 2) or 2.1 (version 3): gear as proxy snapshotter, CRI off. */
export function defaultDisabledPlugins(v: ContainerdVersion): string[] {
  return v === '1.6'
    ? ['io.containerd.grpc.v1.cri']
    : // 2.x splits the CRI into three plugins; NRI would listen on /var/run/nri/nri.sock.
      ['io.containerd.grpc.v1.cri', 'io.containerd.cri.v1.images', 'io.containerd.cri.v1.runtime', 'io.containerd.nri.v1.nri'];
}

/** Go's platform string of this machine (linux/amd64, linux/arm64). */
export function goPlatform(): string {
  const arch: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return `linux/${arch[process.arch] ?? process.arch}`;
}

/** containerd 2.x: the transfer service unpacks into overlayfs and gear (what ctr pull/import use). */
export function transferUnpackConfig(): string {
  const entry = (sn: string) => `  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "${goPlatform()}"
    snapshotter = "${sn}"
    differ = "walking"
`;
  return `[plugins."io.containerd.transfer.v1.local"]
${entry('overlayfs')}${entry('gear')}`;
}

export function containerdConfig(
  v: ContainerdVersion,
  base: string,
  ctrdSocket: string,
  gearSocket: string,
  extra = '',
  disabled = defaultDisabledPlugins(v),
  transferUnpack = true,
): string {
  return `version = ${v === '1.6' ? 2 : 3}
root = "${base}/root"
state = "${base}/state"
disabled_plugins = [${disabled.map((p) => `"${p}"`).join(', ')}]

[grpc]
  address = "${ctrdSocket}"

[ttrpc]
  address = "${ctrdSocket}.ttrpc"

[debug]
  level = "info"

[proxy_plugins]
  [proxy_plugins.gear]
    type = "snapshot"
    address = "${gearSocket}"
${v !== '1.6' && transferUnpack ? `\n${transferUnpackConfig()}` : ''}${extra}`;
}

export async function startGearContainerd(opts: GearContainerdOptions = {}): Promise<GearContainerd> {
  const namespace = opts.namespace ?? 'gear-test';
  const version: ContainerdVersion = opts.containerd ?? '1.6';
  if (version === '2.1') {
    const missing = containerd21Missing();
    if (missing) throw new Error(`containerd 2.1: ${missing}`);
  }
  const containerdBin = version === '1.6' ? CONTAINERD : CONTAINERD21;
  const ctrBin = version === '1.6' ? CTR : CTR21;
  const ctrdEnv = version === '1.6' ? process.env : { ...process.env, PATH: containerd21Path() };
  const base = mkdtempSync('/tmp/gear-ctrd-');
  const configFile = join(base, 'config.toml');
  const logs = { containerd: join(base, 'containerd.log'), gear: join(base, 'gear.log') };
  const gearRoot = join(base, 'gear');
  const gearSocket = join(base, 'gear.sock');
  const ctrdSocket = join(base, 'containerd.sock');
  mkdirSync(join(base, 'root'));
  mkdirSync(join(base, 'state'));
  let gear: ChildProcess | undefined;
  let containerd: ChildProcess | undefined;

  const ctr = (args: string[], timeoutMs = 120_000) => run(ctrBin, ['--address', ctrdSocket, '--namespace', namespace, ...args], { timeoutMs });
  const ctrOk = async (args: string[], timeoutMs?: number): Promise<string> => {
    const r = await ctr(args, timeoutMs);
    if (r.code !== 0) {
      throw new Error(
        `ctr ${args.join(' ')} exited ${r.code}: ${r.stderr}\n--- containerd log:\n${tailFile(logs.containerd)}\n--- gear log:\n${tailFile(logs.gear)}`,
      );
    }
    return r.stdout;
  };

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    // A failed run may leave a task behind: kill it through containerd first.
    if (running(containerd)) {
      for (const t of opts.tasks ?? []) {
        await ctr(['task', 'kill', '-s', 'KILL', t], 20_000);
        await ctr(['task', 'rm', '-f', t], 20_000);
        await ctr(['container', 'rm', t], 20_000);
      }
    }
    if (containerd) await stopChild(containerd);
    // Shims and anything else we started that still runs under our dir.
    for (const pid of pidsReferencing(base)) await stopPid(pid, 10_000);
    // Container roots (their lowers include the miss filesystem) before gear stops serving it.
    await unmountUnder(join(base, 'root'));
    await unmountUnder(join(base, 'state'));
    if (gear) await stopChild(gear);
    await unmountUnder(base);
    rmSync(base, { recursive: true, force: true });
  };

  const startGear = async () => {
    gear = startLogged(
      'node',
      [GEAR_CLI, 'snapshotter', '--root', gearRoot, '--socket', gearSocket, '--log-level', opts.gearLogLevel ?? 'debug', ...(opts.gearArgs ?? [])],
      logs.gear,
    );
    const g = gear;
    // After a crash the old socket file is still there: wait for the new process to answer on it.
    const up = await waitFor(async () => g.exitCode === null && existsSync(gearSocket) && (await ctr(['snapshots', '--snapshotter', 'gear', 'ls'], 10_000)).code === 0, 30_000, 200);
    if (!up) throw new Error(`gear snapshotter did not come up:\n${tailFile(logs.gear)}`);
  };
  const startContainerd = async () => {
    if (running(containerd)) throw new Error('startContainerd: containerd is running');
    containerd = startLogged(containerdBin, ['--config', configFile], logs.containerd, ctrdEnv);
    const d = containerd;
    let up = false;
    await waitFor(async () => !running(d) || (up = existsSync(ctrdSocket) && (await ctr(['version'], 10_000)).code === 0), 60_000, 250);
    if (!up) {
      const how = d.exitCode !== null || d.signalCode !== null ? ` (exited ${d.exitCode ?? d.signalCode})` : '';
      throw new Error(`containerd ${version} did not start${how}:\n${tailFile(logs.containerd)}`);
    }
  };
  const stopContainerd = async () => {
    if (containerd) await stopChild(containerd, 30_000);
    containerd = undefined;
  };
  const stopGear = async () => {
    if (gear) await stopChild(gear, 30_000);
  };
  const killGear = async () => {
    const g = gear;
    if (!g || g.exitCode !== null || g.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => g.once('exit', () => resolve()));
    g.kill('SIGKILL');
    await exited;
  };

  try {
    gear = startLogged(
      'node',
      [GEAR_CLI, 'snapshotter', '--root', gearRoot, '--socket', gearSocket, '--log-level', opts.gearLogLevel ?? 'debug', ...(opts.gearArgs ?? [])],
      logs.gear,
    );
    if (!(await waitFor(() => existsSync(gearSocket), 30_000, 100))) {
      throw new Error(`gear snapshotter did not listen:\n${tailFile(logs.gear)}`);
    }
    writeFileSync(configFile, containerdConfig(version, base, ctrdSocket, gearSocket, opts.extraConfig, opts.disabledPlugins, opts.transferUnpack));
    await startContainerd();
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    version,
    containerdBin,
    ctrBin,
    base,
    configFile,
    logs,
    gearRoot,
    gearSocket,
    ctrdSocket,
    ctr,
    ctrOk,
    killGear,
    stopGear,
    startGear,
    stopContainerd,
    startContainerd,
    async restartContainerd() {
      await stopContainerd();
      await startContainerd();
    },
    pids: () => ({ containerd: running(containerd) ? containerd.pid : undefined, gear: running(gear) ? gear.pid : undefined }),
    stop,
  };
}
