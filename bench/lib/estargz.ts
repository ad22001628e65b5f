/**
 * eStargz, the peer `make bench` measures Gear against (issue 11): a private
 * containerd 1.6 (Debian 12's) with our stargz snapshotter daemon as its proxy
 * snapshotter `stargz` (bench/estargz/main.go, built by bench/estargz/build.sh),
 * and ctr-remote 0.12 (Debian 12's stargz-snapshotter) to convert, optimize and
 * lazily pull images.
 *
 *   converter   a containerd without the stargz snapshotter: `ctr-remote image
 *               pull` of the Docker image, `image convert --estargz --oci` (the
 *               `estargz` system) and `image optimize --oci` (`estargz-opt`: runs
 *               the task once under fanotify, puts the files it read first in
 *               each layer and marks them for prefetch), then `image push`
 *   node        a fresh containerd + daemon per deploy (empty caches):
 *               `ctr-remote image rpull --plain-http` (pulls manifest and config,
 *               mounts the layers lazily) then `ctr run --snapshotter stargz
 *               --rm` of the task in a network namespace holding only a
 *               loopback that is up (as `docker run --network none`)
 *
 * Everything lives under one temp dir per instance (roots, state, sockets,
 * configs, logs); stop() stops only what it started (by PID), unmounts what is
 * left under the dir, removes it.
 */
import { type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { withLoopbackNetns } from './netns.js';
import { log } from './common.js';
import { pidsReferencing, run, spawnLogged, stopChild, stopPid, tailFile, unmountUnder, waitFor, type RunResult } from '../../test/helpers/proc.js';

export const CONTAINERD = '/usr/bin/containerd';
export const CTR = '/usr/bin/ctr';
export const CTR_REMOTE = '/usr/bin/ctr-remote';
/** Built by bench/estargz/build.sh (bench/run.sh runs it). */
export const STARGZ_DAEMON = new URL('../../build/bench/gear-stargz-grpc', import.meta.url).pathname;

/** Why eStargz cannot be measured here, or undefined when it can. */
export function estargzMissing(): string | undefined {
  for (const [f, fix] of [
    [CTR_REMOTE, 'bash scripts/install-bench-deps.sh'],
    [CONTAINERD, 'bash scripts/install-deps.sh'],
    [STARGZ_DAEMON, 'bash bench/estargz/build.sh'],
  ] as const) {
    if (!existsSync(f)) return `${f} missing: run ${fix}`;
  }
  return undefined;
}

export interface StargzNodeOptions {
  /** Registries reached over plain HTTP (the bench registry). */
  insecure: string[];
  /** Start the stargz snapshotter daemon (a deploy node); false = a plain converter containerd. */
  stargz: boolean;
  /** Optional TOML of the stargz filesystem config (upstream's [fs] keys). */
  fsConfig?: string;
  namespace?: string;
}

export interface StargzNode {
  dir: string;
  /** ctr-remote / ctr against this containerd; never throws for a non-zero exit. */
  ctr(args: string[], timeoutMs?: number, bin?: string): Promise<RunResult>;
  /** Like ctr() but throws with stderr and both log tails. */
  ctrOk(args: string[], timeoutMs?: number, bin?: string): Promise<RunResult>;
  /** `ctr run --rm` of task in a fresh loopback-only netns; throws when it fails. */
  runTask(ref: string, task: string[], timeoutMs?: number): Promise<RunResult>;
  stop(): Promise<void>;
}

let seq = 0;

export async function startStargzNode(opts: StargzNodeOptions): Promise<StargzNode> {
  const namespace = opts.namespace ?? 'bench';
  const dir = mkdtempSync('/tmp/gear-bench-esgz-');
  const sock = join(dir, 'containerd.sock');
  const sgzSock = join(dir, 'stargz.sock');
  const ctrdLog = join(dir, 'containerd.log');
  const sgzLog = join(dir, 'stargz.log');
  let containerd: ChildProcess | undefined;
  let daemon: ChildProcess | undefined;

  const tails = () => `--- containerd log:\n${tailFile(ctrdLog, 20)}\n--- stargz log:\n${tailFile(sgzLog, 30)}`;
  const ctr = (args: string[], timeoutMs = 300_000, bin = CTR_REMOTE) => run(bin, ['--address', sock, '--namespace', namespace, ...args], { timeoutMs });
  const ctrOk = async (args: string[], timeoutMs?: number, bin?: string) => {
    const r = await ctr(args, timeoutMs, bin);
    if (r.code !== 0) throw new Error(`${bin ?? CTR_REMOTE} ${args.join(' ')} exited ${r.code}: ${r.stderr.slice(-3000)}\n${tails()}`);
    return r;
  };

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    if (containerd) await stopChild(containerd, 20_000);
    // Shims (and their tasks) we started under dir.
    for (const pid of pidsReferencing(dir)) if (pid !== daemon?.pid) await stopPid(pid, 10_000);
    await unmountUnder(join(dir, 'root'));
    await unmountUnder(join(dir, 'state'));
    // The daemon's Close unmounts its FUSE layers.
    if (daemon) await stopChild(daemon, 20_000);
    await unmountUnder(dir);
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    mkdirSync(join(dir, 'root'));
    mkdirSync(join(dir, 'state'));
    if (opts.stargz) {
      const args = ['--address', sgzSock, '--root', join(dir, 'stargz'), '--pidfile', join(dir, 'stargz.pid'), '--log-level', 'info'];
      for (const h of opts.insecure) args.push('--insecure-registry', h);
      if (opts.fsConfig) {
        writeFileSync(join(dir, 'stargz.toml'), opts.fsConfig);
        args.push('--config', join(dir, 'stargz.toml'));
      }
      daemon = spawnLogged(STARGZ_DAEMON, args, sgzLog);
      const d = daemon;
      if (!(await waitFor(() => d.exitCode === null && existsSync(join(dir, 'stargz.pid')), 30_000, 100))) {
        throw new Error(`the stargz snapshotter daemon did not come up:\n${tailFile(sgzLog)}`);
      }
    }
    const config = [
      'version = 2',
      `root = "${dir}/root"`,
      `state = "${dir}/state"`,
      'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
      '[grpc]',
      `  address = "${sock}"`,
      '[ttrpc]',
      `  address = "${sock}.ttrpc"`,
      ...(opts.stargz ? ['[proxy_plugins]', '  [proxy_plugins.stargz]', '    type = "snapshot"', `    address = "${sgzSock}"`] : []),
      '',
    ].join('\n');
    writeFileSync(join(dir, 'config.toml'), config);
    containerd = spawnLogged(CONTAINERD, ['--config', join(dir, 'config.toml')], ctrdLog);
    const c = containerd;
    const up = await waitFor(async () => c.exitCode === null && existsSync(sock) && (await ctr(['version'], 10_000, CTR)).code === 0, 60_000, 250);
    if (!up) throw new Error(`containerd did not start:\n${tails()}`);
  } catch (e) {
    await stop();
    throw e;
  }

  const runTask = (ref: string, task: string[], timeoutMs = 900_000): Promise<RunResult> =>
    withLoopbackNetns((ns) => ctrOk(['run', '--snapshotter', 'stargz', '--rm', '--with-ns', `network:${ns}`, ref, `task${++seq}`, ...task], timeoutMs, CTR));

  return { dir, ctr, ctrOk, runTask, stop };
}

export interface EstargzPublished {
  /** `ctr-remote image convert --estargz --oci` alone (the source already pulled). */
  convertSeconds: number;
  /** `ctr-remote image optimize --oci` alone (runs the task once). */
  optimizeSeconds: number;
  pushSeconds: number;
  optimizeOutput: string;
  /** Exit code of the task during optimize ("container exit with code N"), undefined when not logged. */
  optimizeTaskExit?: number;
}

/**
 * Converts the Docker image at src into an eStargz image at dst and an
 * optimized one at dstOpt, both pushed to the same registry. The optimizer runs
 * task (entrypoint task[0], arguments the rest) for at most periodS seconds.
 */
export async function publishEstargz(src: string, dst: string, dstOpt: string | undefined, task: string[], insecure: string[], periodS = 10): Promise<EstargzPublished> {
  const n = await startStargzNode({ insecure, stargz: false, namespace: 'convert' });
  const now = () => Number(process.hrtime.bigint()) / 1e9;
  try {
    await n.ctrOk(['image', 'pull', '--plain-http', src], 900_000);
    let t0 = now();
    await n.ctrOk(['image', 'convert', '--estargz', '--oci', src, dst], 1_800_000);
    const convertSeconds = now() - t0;
    t0 = now();
    // dstOpt undefined: the plain eStargz image only (the version series).
    const opt = dstOpt
      ? await n.ctrOk(
          ['image', 'optimize', '--oci', '--period', String(periodS), '--entrypoint', JSON.stringify(task.slice(0, 1)), '--args', JSON.stringify(task.slice(1)), src, dstOpt],
          1_800_000,
        )
      : { stdout: '', stderr: '' };
    const optimizeSeconds = dstOpt ? now() - t0 : 0;
    t0 = now();
    // A push can break off mid-blob ("failed to copy: … unexpected EOF", session 15's first run of
    // record lost its cold-deploy section to one): pushing again sends only what is missing.
    const push = async (ref: string) => {
      for (let attempt = 1; ; attempt++) {
        try {
          return await n.ctrOk(['image', 'push', '--plain-http', ref], 900_000);
        } catch (err) {
          if (attempt >= 3 || !/unexpected EOF|connection reset|broken pipe/i.test(String(err))) throw err;
          log(`estargz: push of ${ref} failed (attempt ${attempt} of 3), pushing again: ${String(err).slice(0, 200)}`);
        }
      }
    };
    await push(dst);
    if (dstOpt) await push(dstOpt);
    const pushSeconds = now() - t0;
    const out = opt.stdout + opt.stderr;
    const exit = /container exit with code (\d+)/.exec(out);
    return { convertSeconds, optimizeSeconds, pushSeconds, optimizeOutput: out.slice(-2000), ...(exit ? { optimizeTaskExit: Number(exit[1]) } : {}) };
  } finally {
    await n.stop();
  }
}
