/**
 * Kubernetes' CRI on gear: containerd 2.1's CRI plugin with `snapshotter =
 * "gear"` (test/helpers/cri.ts), driven through the CRI's own gRPC API by a
 * small client (test/helpers/cri-client.ts, the packaged api.proto loaded at
 * run time) in the order a kubelet calls it: PullImage, RunPodSandbox,
 * CreateContainer, StartContainer, ContainerStatus, ExecSync, the container
 * log file under the pod's log directory, StopContainer, RemoveContainer,
 * StopPodSandbox, RemovePodSandbox, RemoveImage — then containerd's garbage
 * collection must have released gear's layers.
 *
 * Two images from one real registry (behind a counting proxy):
 * - a Gear image (`gear convert` of busybox + data files): the pull fetches
 *   only the config and the index layer; the pod's container then fetches only
 *   the files it opens (registry blob GETs), a second read comes from the pool;
 * - an ordinary image (pushed with ctr), unpacked on gear as plain layers.
 *
 * The kubelet itself is not run: this is its CRI traffic, not a node.
 * Pods use the node's network (no CNI on these machines).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CriError, type CriMessage } from '../helpers/cri-client.js';
import { SANDBOX_IMAGE, startCriContainerd, type CriContainerd } from '../helpers/cri.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const dirEntries = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((n) => !n.startsWith('.')) : []);

let node: CriContainerd | undefined;
let reg: TestRegistry | undefined;
let proxy: FaultProxy | undefined;

const files = { a: randomBytes(300_000), b: randomBytes(200_000), unused: randomBytes(300_000) };
let busybox: Buffer;
let gearRef = '';
let plainRef = '';

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  node = await startCriContainerd({ plainHttpRegistries: [proxy.host] });
  const bb: LayerEntry[] = await busyboxLayer();
  busybox = bb.find((e) => e.path === 'bin/busybox')!.content as Buffer;

  // The Gear image: busybox and three data files, converted into the registry.
  const src = join(node.base, 'gear-src.tar');
  await writeDockerArchive(src, [[...bb, { path: 'data/', type: 'dir' }, ...Object.entries(files).map(([n, c]) => ({ path: `data/${n}`, content: c, mode: 0o644 }))]], 'src/app:v1');
  gearRef = `${proxy.host}/gear/app:v1`;
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', `docker-archive:${src}`, gearRef], { timeoutMs: 300_000 });

  // The ordinary image, pushed by containerd's own client from another namespace.
  plainRef = `${proxy.host}/plain/busybox:v1`;
  const plain = join(node.base, 'plain.tar');
  await writeDockerArchive(plain, [bb, [{ path: 'etc/', type: 'dir' }, { path: 'etc/release', content: 'plain layer two\n' }]], plainRef);
  await node.ctrOk(['image', 'import', '--no-unpack', plain], { namespace: 'gear-push', timeoutMs: 120_000 });
  await node.ctrOk(['image', 'push', '--plain-http', plainRef], { namespace: 'gear-push', timeoutMs: 120_000 });
  await node.ctrOk(['image', 'rm', '--sync', plainRef], { namespace: 'gear-push' });
}, 300_000);

afterAll(async () => {
  await node?.stop();
  await proxy?.stop();
  await reg?.stop();
}, 180_000);

/** A pod as a kubelet would describe one with hostNetwork: true (no hostname: the node's UTS namespace). */
function podConfig(name: string): CriMessage {
  const uid = `uid-${name}`;
  return {
    metadata: { name, uid, namespace: 'default', attempt: 0 },
    log_directory: join(node!.podLogRoot, `default_${name}_${uid}`),
    labels: { app: name },
    linux: { security_context: { namespace_options: { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' } } },
  };
}

describe("containerd 2.1's CRI with snapshotter gear", () => {
  /** Registry blob GETs of one Gear file (convert --storage raw: blob digest = content digest). */
  const gets = (content: Buffer) => proxy!.seen.filter((l) => l.startsWith('GET ') && l.includes(`/blobs/sha256:${hex(content)}`)).length;
  const gearRoot = () => node!.gearRoot;
  const inPool = (content: Buffer) => existsSync(join(gearRoot(), 'pool/sha256', hex(content).slice(0, 2), hex(content)));
  const gearIndexLayers = () => dirEntries(join(gearRoot(), 'layers')).filter((id) => existsSync(join(gearRoot(), 'layers', id, 'index')));

  it('serves a pod lifecycle on a lazily pulled Gear image and an ordinary one, then releases the layers on RemoveImage', async () => {
    const cri = node!.cri;
    const v = await cri.runtime('Version', {});
    expect(v.runtime_name).toBe('containerd');
    expect(v.runtime_version).toMatch(/^2\.1\./);
    const status = await cri.runtime('Status', {});
    const ready = (status.status.conditions as CriMessage[]).find((c) => c.type === 'RuntimeReady');
    expect(ready?.status, JSON.stringify(status)).toBe(true);
    // What `crictl info` and `crictl imagefsinfo` show an admin (docs/containerd.md, "Kubernetes node").
    const info = await cri.runtime('Status', { verbose: true });
    expect(JSON.parse(info.info.config as string).containerd.runtimes.runc.snapshotter).toBe('gear');
    const fsInfo = await cri.image('ImageFsInfo', {});
    expect(fsInfo.image_filesystems[0].fs_id.mountpoint).toBe(join(node!.base, 'root/io.containerd.snapshotter.v1.gear'));
    expect((await cri.image('ImageStatus', { image: { image: SANDBOX_IMAGE } })).image.pinned).toBe(true);

    // ---- PullImage: Gear image (index + config only), ordinary image (all its layers).
    const before = proxy!.seen.length;
    const pulledGear = await cri.image('PullImage', { image: { image: gearRef } }, 300_000);
    expect(pulledGear.image_ref).toMatch(/^sha256:[0-9a-f]{64}$/);
    const blobGets = proxy!.seen.slice(before).filter((l) => l.startsWith('GET ') && l.includes('/blobs/'));
    expect(blobGets, 'the Gear pull fetched the config and the index layer only').toHaveLength(2);
    expect(gearIndexLayers(), 'gear adopted the index layer at Commit').toHaveLength(1);
    expect(gets(busybox) + gets(files.a) + gets(files.b) + gets(files.unused)).toBe(0);

    const pulledPlain = await cri.image('PullImage', { image: { image: plainRef } }, 300_000);
    expect(pulledPlain.image_ref).toMatch(/^sha256:[0-9a-f]{64}$/);
    const listed = ((await cri.image('ListImages', {})).images as CriMessage[]).flatMap((i) => i.repo_tags as string[]);
    expect(listed).toEqual(expect.arrayContaining([gearRef, plainRef, SANDBOX_IMAGE]));
    const gearStatus = await cri.image('ImageStatus', { image: { image: gearRef } });
    expect(gearStatus.image?.id).toBe(pulledGear.image_ref);

    // ---- RunPodSandbox (the pinned pause image, unpacked on gear).
    const pod = podConfig('gear-pod');
    const { pod_sandbox_id: podId } = await cri.runtime('RunPodSandbox', { config: pod }, 120_000);
    expect(podId).toMatch(/^[0-9a-f]{64}$/);
    const podStatus = await cri.runtime('PodSandboxStatus', { pod_sandbox_id: podId });
    expect(podStatus.status.state).toBe('SANDBOX_READY');

    // ---- CreateContainer / StartContainer on the Gear image: reads /data/a at start.
    const app = await cri.runtime(
      'CreateContainer',
      {
        pod_sandbox_id: podId,
        sandbox_config: pod,
        config: {
          metadata: { name: 'app', attempt: 0 },
          image: { image: gearRef },
          command: ['/bin/busybox', 'sh', '-c', 'sha256sum /data/a | cut -c1-64; ls /data; echo ready; exec /bin/busybox sleep 600'],
          log_path: 'app/0.log',
          labels: { role: 'app' },
        },
      },
      120_000,
    );
    const appId = app.container_id as string;
    await cri.runtime('StartContainer', { container_id: appId }, 120_000);

    // ---- Logs: the CRI log file under the pod's log directory.
    const appLog = join(pod.log_directory as string, 'app/0.log');
    const logged = await waitFor(() => existsSync(appLog) && readFileSync(appLog, 'utf8').includes(' stdout F ready'), 60_000, 250);
    expect(logged, `no "ready" in ${appLog}:\n${existsSync(appLog) ? readFileSync(appLog, 'utf8') : '(missing)'}\n${node!.logTails()}`).toBe(true);
    // CRI log format: <RFC3339Nano time> <stream> <P|F> <content>
    const lines = readFileSync(appLog, 'utf8').trim().split('\n').map((l) => l.split(' ').slice(3).join(' '));
    expect(lines).toEqual([hex(files.a), 'a', 'b', 'unused', 'ready']);

    // ---- ContainerStatus
    const st = (await cri.runtime('ContainerStatus', { container_id: appId })).status;
    expect(st.state).toBe('CONTAINER_RUNNING');
    expect(st.metadata.name).toBe('app');
    // image_ref is the repo digest the image was pulled by.
    expect(gearStatus.image.repo_digests).toContain(st.image_ref);
    expect(st.image_ref).toMatch(new RegExp(`^${proxy!.host}/gear/app@sha256:[0-9a-f]{64}$`));
    expect(st.log_path).toBe(appLog);
    expect(Number(st.started_at)).toBeGreaterThan(0);

    // ---- ExecSync: reads /data/b, stats /data/unused without opening it.
    const ex = await cri.runtime('ExecSync', { container_id: appId, cmd: ['/bin/busybox', 'sh', '-c', 'sha256sum /data/b | cut -c1-64; stat -c %s /data/unused'], timeout: 60 }, 90_000);
    expect(ex.exit_code).toBe(0);
    expect(Buffer.from(ex.stdout).toString()).toBe(`${hex(files.b)}\n${files.unused.length}\n`);
    const failing = await cri.runtime('ExecSync', { container_id: appId, cmd: ['/bin/busybox', 'sh', '-c', 'echo oops >&2; exit 3'], timeout: 30 }, 60_000);
    expect(failing.exit_code).toBe(3);
    expect(Buffer.from(failing.stderr).toString()).toBe('oops\n');

    // Lazy: only the opened files were fetched, once each; the unopened one never.
    expect(gets(busybox)).toBe(1);
    expect(gets(files.a)).toBe(1);
    expect(gets(files.b)).toBe(1);
    expect(gets(files.unused)).toBe(0);
    expect(inPool(files.a) && inPool(files.b) && inPool(busybox)).toBe(true);
    expect(inPool(files.unused)).toBe(false);
    // A second read comes from the pool.
    const again = await cri.runtime('ExecSync', { container_id: appId, cmd: ['/bin/busybox', 'sha256sum', '/data/a'], timeout: 30 }, 60_000);
    expect(Buffer.from(again.stdout).toString().slice(0, 64)).toBe(hex(files.a));
    expect(gets(files.a)).toBe(1);

    // ---- A container of the ordinary image in the same pod: runs to completion.
    const plain = await cri.runtime(
      'CreateContainer',
      {
        pod_sandbox_id: podId,
        sandbox_config: pod,
        config: { metadata: { name: 'plain', attempt: 0 }, image: { image: plainRef }, command: ['/bin/busybox', 'cat', '/etc/release'], log_path: 'plain/0.log' },
      },
      120_000,
    );
    const plainId = plain.container_id as string;
    await cri.runtime('StartContainer', { container_id: plainId }, 120_000);
    const exited = await waitFor(async () => (await cri.runtime('ContainerStatus', { container_id: plainId })).status.state === 'CONTAINER_EXITED', 60_000, 250);
    expect(exited).toBe(true);
    const plainSt = (await cri.runtime('ContainerStatus', { container_id: plainId })).status;
    expect(plainSt.exit_code).toBe(0);
    expect(readFileSync(join(pod.log_directory as string, 'plain/0.log'), 'utf8')).toMatch(/ stdout F plain layer two\n$/);

    // ---- Stop / Remove containers and the pod.
    await cri.runtime('StopContainer', { container_id: appId, timeout: 2 }, 60_000);
    const stopped = (await cri.runtime('ContainerStatus', { container_id: appId })).status;
    expect(stopped.state).toBe('CONTAINER_EXITED');
    const listedC = ((await cri.runtime('ListContainers', { filter: { pod_sandbox_id: podId } })).containers as CriMessage[]).map((c) => c.id);
    expect(listedC.sort()).toEqual([appId, plainId].sort());
    for (const id of [appId, plainId]) await cri.runtime('RemoveContainer', { container_id: id }, 60_000);
    await expect(cri.runtime('ContainerStatus', { container_id: appId })).rejects.toMatchObject({ code: 5 } satisfies Partial<CriError>);
    await cri.runtime('StopPodSandbox', { pod_sandbox_id: podId }, 60_000);
    await cri.runtime('RemovePodSandbox', { pod_sandbox_id: podId }, 60_000);
    expect((await cri.runtime('ListPodSandbox', {})).items).toEqual([]);

    // ---- RemoveImage and garbage collection: gear's layers of both images released.
    await cri.image('RemoveImage', { image: { image: gearRef } }, 120_000);
    await cri.image('RemoveImage', { image: { image: plainRef } }, 120_000);
    const left = ((await cri.image('ListImages', {})).images as CriMessage[]).flatMap((i) => i.repo_tags as string[]);
    expect(left).toEqual([SANDBOX_IMAGE]);
    // Only the sandbox image's one committed snapshot is left, in containerd and in gear.
    const gcDone = await waitFor(async () => {
      const snaps = (await node!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).trim().split('\n').slice(1);
      return snaps.length === 1 && dirEntries(join(gearRoot(), 'snapshotter/snapshots')).length === 1;
    }, 60_000, 500);
    expect(gcDone, `${await node!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])}\n${node!.logTails()}`).toBe(true);
    expect(dirEntries(join(gearRoot(), 'layers'))).toHaveLength(1);
    expect(gearIndexLayers()).toEqual([]);
    expect(dirEntries(join(gearRoot(), 'pool/.meta/refs')).filter((n) => n.endsWith('.json'))).toEqual([]);
  }, 240_000);
});
