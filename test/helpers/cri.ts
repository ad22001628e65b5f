/**
 * A private containerd 2.1 with its CRI plugin on and `gear snapshotter` as
 * the CRI's snapshotter — what a Kubernetes node runs, minus the kubelet
 * (tests drive the CRI themselves through test/helpers/cri-client.ts).
 * Everything lives under one temp dir: containerd's root, state, sockets,
 * config.toml and hosts.toml files, gear's root and socket, the pods' log
 * dirs and both logs. The machine's default containerd is never touched.
 *
 * What containerd 2.1 needs for the CRI here, as found:
 * - config version 3: the CRI is three plugins, io.containerd.cri.v1.images
 *   (`snapshotter = "gear"`, the pinned sandbox image, registry hosts dir),
 *   io.containerd.cri.v1.runtime (runc runtime with `snapshotter = "gear"` and
 *   BinaryName Debian 12's /usr/sbin/runc, its state Root under the temp dir
 *   (default /run/containerd/runc); CNI dirs under the temp dir) and
 *   io.containerd.grpc.v1.cri (the CRI gRPC service on containerd's own
 *   socket; its streaming server on 127.0.0.1, a free port);
 * - gear as a proxy plugin (`[proxy_plugins.gear] type = "snapshot"`), exporting
 *   `enable_remote_snapshot_annotations = "true"` (unless remoteSnapshotAnnotations
 *   is false): the CRI pulls through the transfer service (its default
 *   `disable_snapshot_annotations = true` leaves it there), which passes
 *   containerd's remote-snapshot labels only to a snapshotter exporting that,
 *   and only then can gear deploy an original image from its attached Gear index;
 * - NRI off (it would listen on /var/run/nri/nri.sock) and the opt plugin's
 *   path under the temp dir (default /opt/containerd);
 * - the transfer service (which the CRI pulls through by default, and ctr
 *   imports through) unpacks only for its unpack_config platform/snapshotter
 *   pairs: one for gear, and its config_path for the hosts.toml files;
 * - a sandbox ("pause") image present in the k8s.io namespace: built here
 *   from Debian's busybox-static (an entrypoint that sleeps until TERM/INT)
 *   and imported with `ctr -n k8s.io image import --snapshotter gear`, pinned
 *   as `pinned_images.sandbox`, so no registry.k8s.io is needed;
 * - where this process lacks CAP_SYS_RESOURCE (some sandboxed CI machines),
 *   restrict_oom_score_adj = true: pause gets oom_score_adj -998, which runc
 *   cannot set there;
 * - no CNI: pods must use the node's network (namespace_options.network NODE);
 *   containerd then never calls a CNI plugin (its CNI "not ready" status stays).
 *   Such pods share the node's UTS namespace too, so, as kubelet does for
 *   hostNetwork pods, they carry no hostname (runc refuses one: "unable to set
 *   hostname without a private UTS namespace");
 * - plain-HTTP registries through `registry.config_path` hosts.toml files
 *   (<dir>/<host>/hosts.toml, server = "http://<host>").
 *
 * stop() stops and removes every pod through the CRI (as a kubelet would on
 * drain), stops containerd, the shims and anything else still running under
 * the dir (by PID), unmounts container roots before gear stops serving the
 * miss filesystem, then gear, then whatever is left, and removes the dir.
 */
import { type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CriClient, UNSTABLE_ROOT, type CriMessage } from './cri-client.js';
import { GEAR_CLI } from './dockerd.js';
import { writeDockerArchive, type LayerEntry } from './oci-images.js';
import { pidsReferencing, run, spawnLogged, stopChild, stopPid, tailFile, unmountUnder, waitFor, type RunResult } from './proc.js';

const CONTAINERD21_BIN_DIR = join(UNSTABLE_ROOT, 'usr/bin');
export const CONTAINERD21 = join(CONTAINERD21_BIN_DIR, 'containerd');
export const CTR21 = join(CONTAINERD21_BIN_DIR, 'ctr');
const SHIM21 = join(CONTAINERD21_BIN_DIR, 'containerd-shim-runc-v2');
/** Debian 12's runc (unstable's needs a newer glibc). */
export const RUNC = process.env.GEAR_DEBUG_RUNC ?? '/usr/sbin/runc';
/** The namespace the CRI keeps its images, containers and sandboxes in. */
export const CRI_NAMESPACE = 'k8s.io';
/** This node's OCI platform (the transfer service unpacks only for configured platform/snapshotter pairs). */
export const PLATFORM = `linux/${process.arch === 'x64' ? 'amd64' : process.arch}`;
/** The locally built sandbox image, pinned in the CRI config. */
export const SANDBOX_IMAGE = 'localhost/gear-test/pause:1';

export interface CriContainerdOptions {
  /** Registries ("127.0.0.1:PORT") the CRI reaches over plain HTTP (hosts.toml). */
  plainHttpRegistries?: string[];
  /** Extra `gear snapshotter` arguments. */
  gearArgs?: string[];
  /** gear log level (default debug). */
  gearLogLevel?: string;
  /**
   * Whether the gear proxy plugin exports `enable_remote_snapshot_annotations = "true"` (default true, as
   * docs/containerd.md's node config does): the CRI's transfer-service pull then passes containerd's
   * remote-snapshot labels, so an original image with an attached Gear index is deployed from that index.
   */
  remoteSnapshotAnnotations?: boolean;
  /**
   * Written as the CRI images plugin's `disable_snapshot_annotations` when given (containerd 2.x's default is
   * true). false makes the CRI pass the remote-snapshot labels itself, but also switches its pulls from the
   * transfer service to its older local pull (containerd logs "Falling back to local image pull mode").
   */
  disableSnapshotAnnotations?: boolean;
}

export interface CriContainerd {
  base: string;
  configFile: string;
  logs: { containerd: string; gear: string };
  gearRoot: string;
  gearSocket: string;
  /** containerd's gRPC socket: the CRI endpoint (what kubelet's --container-runtime-endpoint names). */
  ctrdSocket: string;
  /** Where tests put pods' log dirs (a kubelet uses /var/log/pods). */
  podLogRoot: string;
  /** A connected CRI client. */
  cri: CriClient;
  /** ctr 2.1 against this containerd (namespace k8s.io unless given); never throws for a non-zero exit. */
  ctr(args: string[], opts?: { namespace?: string; timeoutMs?: number }): Promise<RunResult>;
  /** Like ctr() but throws with the stderr and both log tails. */
  ctrOk(args: string[], opts?: { namespace?: string; timeoutMs?: number }): Promise<string>;
  /** The tails of containerd's and gear's logs, for failure messages. */
  logTails(): string;
  stop(): Promise<void>;
}

/** Why containerd 2.1 with the CRI cannot run here, or undefined when it can. */
export function criMissing(): string | undefined {
  for (const f of [CONTAINERD21, CTR21, SHIM21, RUNC]) {
    if (!existsSync(f)) return `${f} is missing (run make unstable-deps: scripts/install-unstable.sh)`;
  }
  return undefined;
}

/**
 * containerd 2.1's config.toml (version 3) for a CRI node on gear. The CRI
 * parts are the same a real node uses (docs/containerd.md shows them); only
 * the paths are the test's.
 */
export function criConfig(p: {
  base: string;
  ctrdSocket: string;
  gearSocket: string;
  hostsDir: string;
  cniDir: string;
  restrictOomScoreAdj: boolean;
  remoteSnapshotAnnotations?: boolean;
  disableSnapshotAnnotations?: boolean;
}): string {
  return `version = 3
root = "${p.base}/root"
state = "${p.base}/state"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "${p.ctrdSocket}"

[ttrpc]
  address = "${p.ctrdSocket}.ttrpc"

[debug]
  level = "info"

[proxy_plugins]
  [proxy_plugins.gear]
    type = "snapshot"
    address = "${p.gearSocket}"
${p.remoteSnapshotAnnotations === false ? '' : '    exports = { enable_remote_snapshot_annotations = "true" }\n'}
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "${p.base}/opt"

  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "gear"
${p.disableSnapshotAnnotations === undefined ? '' : `    disable_snapshot_annotations = ${p.disableSnapshotAnnotations}\n`}    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "${SANDBOX_IMAGE}"
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "${p.hostsDir}"

  [plugins."io.containerd.cri.v1.runtime"]
    cdi_spec_dirs = []
    restrict_oom_score_adj = ${p.restrictOomScoreAdj}
    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        snapshotter = "gear"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
          BinaryName = "${RUNC}"
          Root = "${p.base}/runc"
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["${p.cniDir}/bin"]
      conf_dir = "${p.cniDir}/net.d"

  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

  [plugins."io.containerd.transfer.v1.local"]
    config_path = "${p.hostsDir}"
    [[plugins."io.containerd.transfer.v1.local".unpack_config]]
      platform = "${PLATFORM}"
      snapshotter = "gear"
`;
}

/** hosts.toml for a registry reached over plain HTTP. */
function plainHttpHosts(host: string): string {
  return `server = "http://${host}"

[host."http://${host}"]
  capabilities = ["pull", "resolve", "push"]
`;
}

/** The sandbox image's one layer: busybox-static as /bin/busybox and /bin/sh. */
function pauseLayer(): LayerEntry[] {
  return [
    { path: 'bin/', type: 'dir' },
    { path: 'bin/busybox', content: readFileSync('/bin/busybox'), mode: 0o755 },
    { path: 'bin/sh', type: 'symlink', linkname: 'busybox' },
    { path: 'dev/', type: 'dir' },
    { path: 'proc/', type: 'dir' },
    { path: 'sys/', type: 'dir' },
    { path: 'etc/', type: 'dir' },
    { path: 'tmp/', type: 'dir', mode: 0o1777 },
  ];
}

/** Builds the sandbox image (a docker-archive) at file. It sleeps until SIGTERM/SIGINT, then exits 0, as pause does. */
export async function writePauseImage(file: string): Promise<void> {
  await writeDockerArchive(file, [pauseLayer()], SANDBOX_IMAGE, {
    config: {
      Env: ['PATH=/bin'],
      Entrypoint: ['/bin/busybox', 'sh', '-c', "trap 'exit 0' TERM INT; while :; do /bin/busybox sleep 3600 & wait $!; done"],
      WorkingDir: '/',
    },
  });
}

/**
 * Whether this process may lower its oom_score_adj (CAP_SYS_RESOURCE). The CRI
 * gives pause -998, as kubelet asks; in a sandbox without that capability runc
 * fails ("failed to update /proc/self/oom_score_adj: Permission denied"), so
 * there the config sets restrict_oom_score_adj (no score below containerd's own).
 */
function canLowerOomScoreAdj(): boolean {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  const CAP_SYS_RESOURCE = 24n;
  return !!m && ((BigInt(`0x${m[1]}`) >> CAP_SYS_RESOURCE) & 1n) === 1n;
}

const running = (p: ChildProcess | undefined): p is ChildProcess => !!p && p.exitCode === null && p.signalCode === null;

export async function startCriContainerd(opts: CriContainerdOptions = {}): Promise<CriContainerd> {
  const missing = criMissing();
  if (missing) throw new Error(`containerd 2.1 with the CRI: ${missing}`);
  if (!existsSync(GEAR_CLI)) throw new Error(`${GEAR_CLI} missing: run npx tsc -p tsconfig.json first`);
  const base = mkdtempSync('/tmp/gear-cri-');
  const configFile = join(base, 'config.toml');
  const logs = { containerd: join(base, 'containerd.log'), gear: join(base, 'gear.log') };
  const gearRoot = join(base, 'gear');
  const gearSocket = join(base, 'gear.sock');
  const ctrdSocket = join(base, 'containerd.sock');
  const hostsDir = join(base, 'certs.d');
  const cniDir = join(base, 'cni');
  const podLogRoot = join(base, 'pods');
  for (const d of ['root', 'state', 'opt', 'certs.d', 'cni/bin', 'cni/net.d', 'pods']) mkdirSync(join(base, d), { recursive: true });
  for (const host of opts.plainHttpRegistries ?? []) {
    mkdirSync(join(hostsDir, host), { recursive: true });
    writeFileSync(join(hostsDir, host, 'hosts.toml'), plainHttpHosts(host));
  }
  let gear: ChildProcess | undefined;
  let containerd: ChildProcess | undefined;
  let cri: CriClient | undefined;
  const logTails = () => `--- containerd log:\n${tailFile(logs.containerd)}\n--- gear log:\n${tailFile(logs.gear)}`;

  const ctr = (args: string[], o: { namespace?: string; timeoutMs?: number } = {}) =>
    run(CTR21, ['--address', ctrdSocket, '--namespace', o.namespace ?? CRI_NAMESPACE, ...args], { timeoutMs: o.timeoutMs ?? 120_000 });
  const ctrOk = async (args: string[], o: { namespace?: string; timeoutMs?: number } = {}) => {
    const r = await ctr(args, o);
    if (r.code !== 0) throw new Error(`ctr ${args.join(' ')} exited ${r.code}: ${r.stderr}\n${logTails()}`);
    return r.stdout;
  };

  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    // Pods first, through the CRI, so their tasks end and their mounts go.
    if (cri && running(containerd)) {
      try {
        const { items } = await cri.runtime('ListPodSandbox', {}, 20_000);
        for (const pod of (items ?? []) as Array<{ id: string }>) {
          await cri.runtime('StopPodSandbox', { pod_sandbox_id: pod.id }, 60_000).catch(() => {});
          await cri.runtime('RemovePodSandbox', { pod_sandbox_id: pod.id }, 60_000).catch(() => {});
        }
      } catch {
        /* containerd may be wedged: the PID sweep below still runs */
      }
    }
    cri?.close();
    if (containerd) await stopChild(containerd, 30_000);
    // Shims and anything else still running under our dir.
    for (const pid of pidsReferencing(base)) await stopPid(pid, 10_000);
    await unmountUnder(join(base, 'root'));
    await unmountUnder(join(base, 'state'));
    if (gear) await stopChild(gear, 30_000);
    await unmountUnder(base);
    rmSync(base, { recursive: true, force: true });
  };

  try {
    gear = spawnLogged(
      'node',
      [GEAR_CLI, 'snapshotter', '--root', gearRoot, '--socket', gearSocket, '--log-level', opts.gearLogLevel ?? 'debug', ...(opts.gearArgs ?? [])],
      logs.gear,
    );
    const g = gear;
    if (!(await waitFor(() => !running(g) || existsSync(gearSocket), 30_000, 100)) || !running(g)) {
      throw new Error(`gear snapshotter did not listen:\n${tailFile(logs.gear)}`);
    }
    writeFileSync(
      configFile,
      criConfig({
        base,
        ctrdSocket,
        gearSocket,
        hostsDir,
        cniDir,
        restrictOomScoreAdj: !canLowerOomScoreAdj(),
        remoteSnapshotAnnotations: opts.remoteSnapshotAnnotations,
        disableSnapshotAnnotations: opts.disableSnapshotAnnotations,
      }),
    );
    // containerd finds the 2.1 shim first in PATH; the shim runs BinaryName (Debian 12's runc).
    containerd = spawnLogged(CONTAINERD21, ['--config', configFile], logs.containerd, {
      ...process.env,
      PATH: `${CONTAINERD21_BIN_DIR}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`,
    });
    const d = containerd;
    let up = false;
    await waitFor(async () => !running(d) || (up = existsSync(ctrdSocket) && (await ctr(['version'], { timeoutMs: 10_000 })).code === 0), 60_000, 250);
    if (!up) throw new Error(`containerd 2.1 did not start (exit ${String(d.exitCode ?? d.signalCode ?? 'none: still running')}):\n${tailFile(logs.containerd)}`);

    // The sandbox image, in the CRI's namespace, unpacked on gear.
    const pause = join(base, 'pause.tar');
    await writePauseImage(pause);
    await ctrOk(['image', 'import', '--snapshotter', 'gear', pause], { timeoutMs: 120_000 });

    cri = await CriClient.connect(ctrdSocket);
    // The CRI sees images through containerd's events: wait until it knows the sandbox image.
    const c = cri;
    const known = await waitFor(async () => !!(await c.image('ImageStatus', { image: { image: SANDBOX_IMAGE } }).catch((): CriMessage => ({}))).image, 30_000, 250);
    if (!known) throw new Error(`the CRI does not list the imported sandbox image ${SANDBOX_IMAGE}\n${logTails()}`);
  } catch (err) {
    await stop();
    throw err;
  }
  return { base, configFile, logs, gearRoot, gearSocket, ctrdSocket, podLogRoot, cri: cri!, ctr, ctrOk, logTails, stop };
}
