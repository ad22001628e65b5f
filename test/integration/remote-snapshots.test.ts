/**
 * Dual publication and remote snapshots, end to end on real parts: a real
 * registry (Debian's docker-registry 2.8: no referrers API, so the referrers
 * tag schema), `gear convert --attach`, a real containerd 2.1 with
 * `gear snapshotter` as proxy plugin, and `ctr` (transfer service, which
 * passes containerd's remote-snapshot labels when the snapshotter exports
 * `enable_remote_snapshot_annotations`).
 *
 * - The original image's tag is untouched; its Gear index is a referrer.
 * - A Gear node pulling the *original* reference downloads the manifest, the
 *   config and the Gear index only (no layer blob), and runs it lazily.
 * - A node without Gear (containerd's overlayfs, another namespace) pulls
 *   every layer and runs the same tag with the same output.
 * - A plain image (no referrer) pulled through gear is unpacked normally.
 *
 * Every request goes through a counting proxy in front of the registry.
 */
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runConvert } from '../../src/cli/convert.js';
import { GearMediaType } from '../../src/core/index/manifest.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { containerd21Missing, startGearContainerd, type GearContainerd } from '../helpers/containerd.js';
import { big, blobGets, CHECK, expected, layersOf, pushPlainImage, REMOTE_SNAPSHOT_CONFIG } from '../helpers/remote-images.js';
import { run, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';


const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** Hex digests of the files in gear's pool (ROOT/pool/sha256/ab/<hex>). */
function poolDigests(root: string): string[] {
  const dir = join(root, 'pool', 'sha256');
  return existsSync(dir) ? readdirSync(dir).flatMap((ab) => readdirSync(join(dir, ab))) : [];
}

// Remote snapshots are opt-in (GEAR_REMOTE_SNAPSHOTS=on); the gear this file starts inherits it.
process.env.GEAR_REMOTE_SNAPSHOTS = 'on';
// install-deps.sh installs what this needs: a missing piece is a failure, not a skip.
const missing = containerd21Missing();

describe('remote snapshots: an attached Gear index deploys the original image lazily (containerd 2.1, ctr)', () => {
  let reg: TestRegistry;
  let proxy: FaultProxy;
  let c: GearContainerd | undefined;
  let original: { digest: string; size: number; layers: string[] };
  let plain: { digest: string; size: number; layers: string[] };
  let gearDigest = '';
  let indexDigest = '';

  beforeAll(async () => {
    expect(missing, missing).toBeUndefined();
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    const layers = await layersOf();
    original = await pushPlainImage(reg.host, 'app', '1', layers);
    plain = await pushPlainImage(reg.host, 'plain', '1', [layers[0]!, [{ path: 'etc/', type: 'dir' }, { path: 'etc/plain', content: 'plain image\n' }]]);
    const s = await runConvert(`${reg.host}/app:1`, '', {
      attach: true,
      // Version 2: the assertions below count one GET per file (v3's read-ahead brings pack neighbours along).
      formatVersion: '2',
      concurrency: '4',
      filesPerManifest: '10000',
      insecureRegistry: [],
      progress: false,
      json: true,
    });
    gearDigest = s.manifestDigest;
    indexDigest = s.indexDigest;
    // Our own transfer-service table follows the proxy plugin's exports line (REMOTE_SNAPSHOT_CONFIG), so not the harness's.
    c = await startGearContainerd({ containerd: '2.1', extraConfig: REMOTE_SNAPSHOT_CONFIG, transferUnpack: false, namespace: 'gear-node' });
  }, 300_000);

  afterAll(async () => {
    await c?.stop();
    await proxy?.stop();
    await reg?.stop();
  }, 120_000);

  it('gear convert --attach leaves the tag alone and lists the Gear index under the referrers tag', async () => {
    const client = new RegistryClient();
    try {
      const tagged = await client.getManifest(`${reg.host}/app:1`);
      expect(tagged.digest).toBe(original.digest);
      expect(await client.getReferrers(`${reg.host}/app`, original.digest)).toBeUndefined(); // distribution 2.8: no API
      const refs = await client.getManifest(`${reg.host}/app:sha256-${original.digest.slice(7)}`);
      const list = (refs.manifest as { manifests: { digest: string; artifactType?: string }[] }).manifests;
      expect(list.filter((d) => d.artifactType === GearMediaType.IndexReferrer).map((d) => d.digest)).toEqual([gearDigest]);
      const gear = await client.getManifest(`${reg.host}/app@${gearDigest}`);
      const m = gear.manifest as { artifactType?: string; subject?: { digest: string; size: number }; layers: unknown[] };
      expect(m.artifactType).toBe(GearMediaType.IndexReferrer);
      expect(m.subject).toMatchObject({ digest: original.digest, size: original.size });
      expect(m.layers).toHaveLength(1);
      // Kept alive through `garbage-collect --delete-untagged` by a tag of its own.
      expect((await client.getManifest(`${reg.host}/app:sha256-${original.digest.slice(7)}.gear`)).digest).toBe(gearDigest);
    } finally {
      await client.close();
    }
  });

  it('a Gear node pulling the original downloads only manifest, config and the Gear index, and runs it', async () => {
    const ref = `${proxy.host}/app:1`;
    const before = proxy.seen.length;
    await c!.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    const seen = proxy.seen.slice(before);
    expect(blobGets(seen, original.layers), seen.join('\n')).toEqual([]);
    expect(blobGets(seen, [indexDigest])).toHaveLength(1);
    const snaps = await c!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls']);
    expect(snaps.split('\n').filter((l) => l.includes('Committed'))).toHaveLength(original.layers.length);
    const out = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'gear-t1', ...CHECK], 180_000);
    expect(out).toBe(expected());
    // Still no layer blob: the container's files came from the Gear files, fetched as they were opened.
    expect(blobGets(proxy.seen.slice(before), original.layers)).toEqual([]);
    const pooled = poolDigests(c!.gearRoot);
    expect(pooled).toContain(sha(big).slice(7));
    expect(pooled).toContain(sha(Buffer.from('version=2\n')).slice(7));
    expect(pooled).not.toContain(sha(Buffer.from('kept\n')).slice(7)); // listed by ls, never opened
    // kill -9 and restart of gear: the Gear-served snapshots are recorded like any other.
    await c!.killGear();
    await c!.startGear();
    expect(await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'gear-t1b', ...CHECK], 180_000)).toBe(expected());
  }, 600_000);

  it('a node without Gear (overlayfs) pulls every layer of the same tag and runs it unchanged', async () => {
    const ref = `${proxy.host}/app:1`;
    const ctrPlain = (args: string[]) => run(c!.ctrBin, ['--address', c!.ctrdSocket, '--namespace', 'plain-node', ...args], { timeoutMs: 300_000 });
    const before = proxy.seen.length;
    const pull = await ctrPlain(['image', 'pull', '--plain-http', '--snapshotter', 'overlayfs', ref]);
    expect(pull.code, pull.stderr).toBe(0);
    const seen = proxy.seen.slice(before);
    expect(new Set(blobGets(seen, original.layers).map((l) => l.split('/blobs/')[1])).size).toBe(original.layers.length);
    expect(blobGets(seen, [indexDigest])).toEqual([]);
    const r = await ctrPlain(['run', '--snapshotter', 'overlayfs', '--rm', ref, 'plain-t1', ...CHECK]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(expected());
  }, 600_000);

  it('a plain image sharing the base layer: the Gear-served empty layer is filled with its content, the rest unpacked as before', async () => {
    const ref = `${proxy.host}/plain:1`;
    const before = proxy.seen.length;
    await c!.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    const seen = proxy.seen.slice(before);
    // Its own top layer by containerd; the shared busybox layer (served empty for app:1) by gear, once.
    expect(blobGets(seen, [plain.layers[1]!])).toHaveLength(1);
    expect(blobGets(seen, [plain.layers[0]!])).toHaveLength(1);
    const out = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'plain-t2', '/bin/busybox', 'sh', '-c', 'cat /etc/plain; /bin/busybox ls /bin/busybox'], 180_000);
    expect(out).toBe('plain image\n/bin/busybox\n');
    // The Gear-deployed original still runs from its index.
    const again = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', `${proxy.host}/app:1`, 'gear-t3', ...CHECK], 180_000);
    expect(again).toBe(expected());
  }, 600_000);

  it('a Gear index that fails its digest check is not used: the pull falls back to downloading the layers', async () => {
    const layers = await layersOf();
    const fb = await pushPlainImage(reg.host, 'fb', '1', [[...layers[0]!, { path: 'etc/fb', content: 'fallback image\n' }], layers[1]!, layers[2]!]);
    const s = await runConvert(`${reg.host}/fb:1`, '', { attach: true, formatVersion: '2', concurrency: '4', filesPerManifest: '10000', insecureRegistry: [], progress: false, json: true });
    // Every download of the index blob arrives with a flipped byte.
    proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes(`/blobs/${s.indexDigest}`) ? { kind: 'flip' } : undefined));
    try {
      const ref = `${proxy.host}/fb:1`;
      const before = proxy.seen.length;
      await c!.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
      const seen = proxy.seen.slice(before);
      expect(blobGets(seen, [s.indexDigest]).length).toBeGreaterThan(0);
      // Its own base layer is downloaded by containerd (its other two blobs are app:1's, already in containerd's content store).
      expect(blobGets(seen, [fb.layers[0]!]).length).toBeGreaterThan(0);
      expect(readFileSync(c!.logs.gear, 'utf8')).toMatch(/cannot use a Gear index for this image/);
      const out = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'fb-t1', '/bin/busybox', 'sh', '-c', 'cat /etc/fb; cat /etc/app.conf'], 180_000);
      expect(out).toBe('fallback image\nversion=2\n');
      const snaps = await c!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls']);
      expect(snaps).not.toMatch(/gear-remote-pending/);
    } finally {
      proxy.setDecider(() => undefined);
    }
  }, 600_000);

  it('removing the images lets containerd garbage-collect every Gear-served snapshot and Gear its layers', async () => {
    for (const img of ['app:1', 'plain:1', 'fb:1']) await c!.ctrOk(['image', 'rm', '--sync', `${proxy.host}/${img}`], 120_000);
    // GC is asynchronous after the last reference goes: wait for gear's records to go.
    const gone = await waitFor(async () => (await c!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).trim().split('\n').length <= 1, 60_000, 500);
    expect(gone, await c!.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).toBe(true);
    const records = readdirSync(join(c!.gearRoot, 'snapshotter', 'snapshots')).filter((n) => n.endsWith('.json'));
    expect(records).toEqual([]);
    const layers = existsSync(join(c!.gearRoot, 'layers')) ? readdirSync(join(c!.gearRoot, 'layers')).filter((n) => !n.startsWith('.')) : [];
    expect(layers).toEqual([]);
  }, 300_000);
});
