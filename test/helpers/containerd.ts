/**
 * A private containerd 1.6 (Debian's /usr/bin/containerd) with `gear
 * snapshotter` as its proxy snapshotter `gear`, everything under one temp
 * dir: containerd's root, state, sockets and config.toml (version 2, CRI
 * off), gear's root and socket, and both logs. The machine's default
 * containerd is never touched.
 *
 * stop() kills the tasks it knows of through containerd, stops containerd,
 * the shims and anything else still running under the dir (by PID), unmounts
 * container roots before gear stops serving the miss filesystem, then gear,
 * then whatever is left, and removes the dir.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI } from './dockerd.js';
import { pidsReferencing, run, stopChild, stopPid, tailFile, unmountUnder, waitFor, type RunResult } from './proc.js';

export const CONTAINERD = '/usr/bin/containerd';
export const CTR = '/usr/bin/ctr';

export interface GearContainerdOptions {
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
  base: string;
  gearRoot: string;
  gearSocket: string;
  ctrdSocket: string;
  /** ctr against this containerd, in its namespace; never throws for a non-zero exit. */
  ctr(args: string[], timeoutMs?: number): Promise<RunResult>;
  /** Like ctr() but throws with the stderr and both log tails. */
  ctrOk(args: string[], timeoutMs?: number): Promise<string>;
  /** kill -9 of `gear snapshotter` (a crash); containerd and its tasks keep running. */
  killGear(): Promise<void>;
  /** Starts `gear snapshotter` again on the same root and socket. */
  startGear(): Promise<void>;
  stop(): Promise<void>;
}

function startLogged(cmd: string, args: string[], log: string): ChildProcess {
  const fd = openSync(log, 'a');
  return spawn(cmd, args, { stdio: ['ignore', fd, fd] });
}

export async function startGearContainerd(opts: GearContainerdOptions = {}): Promise<GearContainerd> {
  const namespace = opts.namespace ?? 'gear-test';
  const base = mkdtempSync('/tmp/gear-ctrd-');
  const gearRoot = join(base, 'gear');
  const gearSocket = join(base, 'gear.sock');
  const ctrdSocket = join(base, 'containerd.sock');
  mkdirSync(join(base, 'root'));
  mkdirSync(join(base, 'state'));
  let gear: ChildProcess | undefined;
  let containerd: ChildProcess | undefined;

  const ctr = (args: string[], timeoutMs = 120_000) => run(CTR, ['--address', ctrdSocket, '--namespace', namespace, ...args], { timeoutMs });
  const ctrOk = async (args: string[], timeoutMs?: number): Promise<string> => {
    const r = await ctr(args, timeoutMs);
    if (r.code !== 0) {
      throw new Error(
        `ctr ${args.join(' ')} exited ${r.code}: ${r.stderr}\n--- containerd log:\n${tailFile(join(base, 'containerd.log'))}\n--- gear log:\n${tailFile(join(base, 'gear.log'))}`,
      );
    }
    return r.stdout;
  };

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    // A failed run may leave a task behind: kill it through containerd first.
    if (containerd?.exitCode === null) {
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
      join(base, 'gear.log'),
    );
    const g = gear;
    // After a crash the old socket file is still there: wait for the new process to answer on it.
    const up = await waitFor(async () => g.exitCode === null && existsSync(gearSocket) && (await ctr(['snapshots', '--snapshotter', 'gear', 'ls'], 10_000)).code === 0, 30_000, 200);
    if (!up) throw new Error(`gear snapshotter did not come up:\n${tailFile(join(base, 'gear.log'))}`);
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
      join(base, 'gear.log'),
    );
    if (!(await waitFor(() => existsSync(gearSocket), 30_000, 100))) {
      throw new Error(`gear snapshotter did not listen:\n${tailFile(join(base, 'gear.log'))}`);
    }
    const config = `version = 2
root = "${base}/root"
state = "${base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

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
`;
    writeFileSync(join(base, 'config.toml'), config);
    containerd = startLogged(CONTAINERD, ['--config', join(base, 'config.toml')], join(base, 'containerd.log'));
    const up = await waitFor(async () => existsSync(ctrdSocket) && (await ctr(['version'], 10_000)).code === 0, 60_000, 250);
    if (!up) throw new Error(`containerd did not start:\n${tailFile(join(base, 'containerd.log'))}`);
  } catch (err) {
    await stop();
    throw err;
  }
  return { base, gearRoot, gearSocket, ctrdSocket, ctr, ctrOk, killGear, startGear, stop };
}
