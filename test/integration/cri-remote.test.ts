/**
 * Remote snapshots through Kubernetes' CRI: containerd 2.1's CRI plugin with
 * `snapshotter = "gear"` and the gear proxy plugin exporting
 * `enable_remote_snapshot_annotations = "true"` (test/helpers/cri.ts, the
 * config docs/containerd.md gives a Kubernetes node). The CRI's default
 * `disable_snapshot_annotations = true` keeps its pulls on the transfer
 * service, which passes containerd's remote-snapshot labels to a snapshotter
 * exporting that switch.
 *
 * An ordinary three-layer image (test/helpers/remote-images.ts) is pushed to a
 * real registry and `gear convert --attach` publishes its Gear index as a
 * referrer. The CRI's PullImage of the *original* tag must download the
 * manifest, the config and the Gear index only (no layer blob); a pod's
 * container on it reads its files lazily (only the opened ones are fetched);
 * RemoveImage lets containerd's GC release every Gear-served snapshot.
 *
 * Every registry request goes through a counting proxy. Without the exports
 * line (or with GEAR_REMOTE_SNAPSHOTS=off for gear) this test fails: the pull
 * downloads every layer blob.
 */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RegistryClient } from '../../src/core/registry/client.js';
import { type CriMessage } from '../helpers/cri-client.js';
import { criMissing, SANDBOX_IMAGE, startCriContainerd, type CriContainerd, type CriContainerdOptions } from '../helpers/cri.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { big, blobGets, CHECK, expected, layersOf, pushPlainImage } from '../helpers/remote-images.js';

const hex = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
const dirEntries = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((n) => !n.startsWith('.')) : []);

// Remote snapshots are opt-in (GEAR_REMOTE_SNAPSHOTS=on); the gear this file starts inherits it.
process.env.GEAR_REMOTE_SNAPSHOTS = 'on';
// install-deps.sh installs what this needs: a missing piece is a failure, not a skip.
const missing = criMissing();

/**
 * The two containerd settings that make the CRI pass the labels: the proxy plugin's exports line (the CRI stays on
 * the transfer service: what docs/containerd.md's node config has), or the CRI's own
 * disable_snapshot_annotations = false (without the exports line; the CRI then uses its local pull).
 */
const settings: Array<{ name: string; opts: CriContainerdOptions; localPull: boolean }> = [
  { name: 'gear exports the switch', opts: {}, localPull: false },
  {
    name: 'CRI local pull',
    opts: { remoteSnapshotAnnotations: false, disableSnapshotAnnotations: false },
    localPull: true,
  },
];

describe.each(settings)("remote snapshots through containerd 2.1's CRI, $name: an attached Gear index deploys the original image lazily", ({ opts, localPull }) => {
  let node: CriContainerd | undefined;
  let reg: TestRegistry | undefined;
  let proxy: FaultProxy | undefined;
  let original: { digest: string; size: number; layers: string[] };
  let indexDigest = '';
  let gearManifest = '';
  let configs = { original: '', gear: '' };

  beforeAll(async () => {
    expect(missing, missing).toBeUndefined();
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    original = await pushPlainImage(reg.host, 'app', '1', await layersOf());
    // The CLI an admin runs; --storage raw so a Gear file's blob digest is its content's, and through the proxy
    // so that the index names the proxy as the Gear files' registry (their fetches are counted below).
    const conv = await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--attach', '--json', '--no-progress', '--storage', 'raw', `${proxy.host}/app:1`], {
      timeoutMs: 120_000,
    });
    const summary = JSON.parse(conv.stdout) as { indexDigest: string; manifestDigest: string };
    indexDigest = summary.indexDigest;
    gearManifest = summary.manifestDigest;
    const client = new RegistryClient();
    try {
      const configOf = async (r: string) => ((await client.getManifest(r)).manifest as { config: { digest: string } }).config.digest;
      configs = { original: await configOf(`${reg.host}/app@${original.digest}`), gear: await configOf(`${reg.host}/app@${gearManifest}`) };
    } finally {
      await client.close();
    }
    node = await startCriContainerd({ plainHttpRegistries: [proxy.host], ...opts });
  }, 180_000);

  afterAll(async () => {
    await node?.stop();
    await proxy?.stop();
    await reg?.stop();
  }, 180_000);

  /** Registry blob GETs of one Gear file (raw storage: blob digest = content digest). */
  const gets = (content: Buffer | string) => proxy!.seen.filter((l) => l.startsWith('GET ') && l.includes(`/blobs/sha256:${hex(content)}`)).length;
  const inPool = (content: Buffer | string) => existsSync(join(node!.gearRoot, 'pool/sha256', hex(content).slice(0, 2), hex(content)));
  const gearIndexLayers = () => dirEntries(join(node!.gearRoot, 'layers')).filter((id) => existsSync(join(node!.gearRoot, 'layers', id, 'index')));
  const gearSnapshots = async () => (await node!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).trim().split('\n').slice(1);

  it('PullImage of the original tag fetches manifest, config and Gear index only; a pod runs it lazily; RemoveImage releases it', async () => {
    const cri = node!.cri;
    const ref = `${proxy!.host}/app:1`;

    // ---- PullImage of the original reference, as a kubelet asks for it.
    const before = proxy!.seen.length;
    const pulled = await cri.image('PullImage', { image: { image: ref } }, 120_000);
    expect(pulled.image_ref).toMatch(/^sha256:[0-9a-f]{64}$/);
    const seen = proxy!.seen.slice(before);
    // The CRI pull path this case is about (containerd logs the fall-back at start, at level warning).
    expect(readFileSync(node!.logs.containerd, 'utf8').includes('Falling back to local image pull mode')).toBe(localPull);
    expect(blobGets(seen, original.layers), `layer blobs downloaded:\n${seen.join('\n')}\n${node!.logTails()}`).toEqual([]);
    expect(blobGets(seen, [indexDigest]), seen.join('\n')).toHaveLength(1);
    // Of the original: its manifest (by tag) and config blob; of the Gear referrer: its manifest, config and index.
    expect(seen.filter((l) => l.startsWith('GET ') && l.includes('/manifests/')).some((l) => l.includes(gearManifest))).toBe(true);
    // Blobs: the original's config (containerd, and gear checking the referrer against it), the Gear config and index.
    const blobDigests = new Set(seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/')).map((l) => l.split('/blobs/')[1]));
    expect([...blobDigests].sort(), seen.join('\n')).toEqual([configs.original, configs.gear, indexDigest].sort());
    expect(gearIndexLayers(), 'gear built the Gear index layer').toHaveLength(1);
    // One committed snapshot per original layer (the lower ones empty, the top one the Gear index), plus the sandbox image's.
    const committed = (await gearSnapshots()).filter((l) => l.includes('Committed'));
    expect(committed, node!.logTails()).toHaveLength(original.layers.length + 1);
    expect(gets(big) + gets('version=2\n') + gets('kept\n')).toBe(0);
    const status = await cri.image('ImageStatus', { image: { image: ref } });
    expect(status.image?.id).toBe(pulled.image_ref);
    expect(status.image.repo_digests).toContain(`${proxy!.host}/app@${original.digest}`);

    // ---- A pod with a container on the original image.
    const uid = 'uid-remote';
    const pod: CriMessage = {
      metadata: { name: 'remote', uid, namespace: 'default', attempt: 0 },
      log_directory: join(node!.podLogRoot, `default_remote_${uid}`),
      linux: { security_context: { namespace_options: { network: 'NODE', pid: 'CONTAINER', ipc: 'POD' } } },
    };
    const { pod_sandbox_id: podId } = await cri.runtime('RunPodSandbox', { config: pod }, 120_000);
    const app = await cri.runtime(
      'CreateContainer',
      {
        pod_sandbox_id: podId,
        sandbox_config: pod,
        config: { metadata: { name: 'app', attempt: 0 }, image: { image: ref }, command: ['/bin/busybox', 'sleep', '600'], log_path: 'app/0.log' },
      },
      120_000,
    );
    const appId = app.container_id as string;
    await cri.runtime('StartContainer', { container_id: appId }, 120_000);
    expect((await cri.runtime('ContainerStatus', { container_id: appId })).status.state).toBe('CONTAINER_RUNNING');

    // ---- ExecSync: the flattened content (upper layer's app.conf, the whiteout applied), read lazily.
    const ex = await cri.runtime('ExecSync', { container_id: appId, cmd: CHECK, timeout: 60 }, 90_000);
    expect(ex.exit_code, Buffer.from(ex.stderr ?? []).toString()).toBe(0);
    expect(Buffer.from(ex.stdout).toString()).toBe(expected());
    // Only the opened files were fetched, once each; a listed-but-unopened file and the overwritten app.conf never.
    expect(gets(big)).toBe(1);
    expect(gets('version=2\n')).toBe(1);
    expect(gets('kept\n')).toBe(0);
    expect(gets('version=1\n')).toBe(0);
    expect(inPool(big) && inPool('version=2\n')).toBe(true);
    expect(inPool('kept\n')).toBe(false);
    // Still no layer blob of the original, over the whole run.
    expect(blobGets(proxy!.seen.slice(before), original.layers)).toEqual([]);

    // ---- Tear down as a kubelet would, then RemoveImage: GC releases every Gear-served snapshot.
    await cri.runtime('StopContainer', { container_id: appId, timeout: 2 }, 60_000);
    await cri.runtime('RemoveContainer', { container_id: appId }, 60_000);
    await cri.runtime('StopPodSandbox', { pod_sandbox_id: podId }, 60_000);
    await cri.runtime('RemovePodSandbox', { pod_sandbox_id: podId }, 60_000);
    await cri.image('RemoveImage', { image: { image: ref } }, 120_000);
    const left = ((await cri.image('ListImages', {})).images as CriMessage[]).flatMap((i) => i.repo_tags as string[]);
    expect(left).toEqual([SANDBOX_IMAGE]);
    const gcDone = await waitFor(async () => (await gearSnapshots()).length === 1 && dirEntries(join(node!.gearRoot, 'snapshotter/snapshots')).length === 1, 60_000, 500);
    expect(gcDone, `${(await gearSnapshots()).join('\n')}\n${node!.logTails()}`).toBe(true);
    expect(gearIndexLayers()).toEqual([]);
    expect(dirEntries(join(node!.gearRoot, 'layers'))).toHaveLength(1); // the sandbox image's
  }, 120_000);
});
