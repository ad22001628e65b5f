/**
 * Dual publication with Docker 28's containerd image store: `docker pull` of
 * an original image whose Gear index is attached (`gear convert --attach`)
 * downloads only manifest, config and the Gear index on a Gear node (dockerd
 * 28.5 over containerd 2.1 with `"storage-driver": "gear"`; moby wraps its
 * pull with containerd's remote-snapshot labels), and runs it lazily; a
 * dockerd 28 whose snapshotter is containerd's overlayfs (a node without
 * Gear) pulls every layer of the same tag and runs it unchanged.
 * Real registry (docker-registry 2.8, referrers tag schema) behind a counting proxy.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runConvert } from '../../src/cli/convert.js';
import { docker28Missing, startDockerd28, type Dockerd28 } from '../helpers/dockerd28.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { blobGets, CHECK, expected, layersOf, pushPlainImage } from '../helpers/remote-images.js';

// Remote snapshots are opt-in (GEAR_REMOTE_SNAPSHOTS=on); the gear this file starts inherits it.
process.env.GEAR_REMOTE_SNAPSHOTS = 'on';
// install-deps.sh installs what this needs: a missing piece is a failure, not a skip.
const missing = docker28Missing();

describe('remote snapshots with Docker 28 (containerd image store)', () => {
  let reg: TestRegistry;
  let proxy: FaultProxy;
  let gear: Dockerd28 | undefined;
  let plainNode: Dockerd28 | undefined;
  let original: { digest: string; size: number; layers: string[] };
  let indexDigest = '';

  beforeAll(async () => {
    expect(missing, missing).toBeUndefined();
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    original = await pushPlainImage(reg.host, 'dapp', '1', await layersOf());
    const s = await runConvert(`${reg.host}/dapp:1`, '', { attach: true, formatVersion: '2', concurrency: '4', filesPerManifest: '10000', insecureRegistry: [], progress: false, json: true });
    indexDigest = s.indexDigest;
  }, 300_000);

  afterAll(async () => {
    await gear?.stop();
    await plainNode?.stop();
    await proxy?.stop();
    await reg?.stop();
  }, 180_000);

  it('docker pull of the original on a Gear node downloads only the Gear index, and docker run works', async () => {
    gear = await startDockerd28();
    expect((await gear.dockerOk(['info', '--format', '{{.Driver}}'])).stdout.trim()).toBe('gear');
    const ref = `${proxy.host}/dapp:1`;
    const before = proxy.seen.length;
    await gear.dockerOk(['pull', ref], { timeoutMs: 300_000 });
    const seen = proxy.seen.slice(before);
    expect(blobGets(seen, original.layers), seen.join('\n')).toEqual([]);
    expect(blobGets(seen, [indexDigest])).toHaveLength(1);
    const out = await gear.dockerOk(['run', '--rm', ref, ...CHECK], { timeoutMs: 180_000 });
    expect(out.stdout).toBe(expected());
    expect(blobGets(proxy.seen.slice(before), original.layers)).toEqual([]);
  }, 600_000);

  it('a Docker 28 node without Gear (overlayfs) pulls every layer of the same tag and runs it', async () => {
    plainNode = await startDockerd28({ daemonJson: { 'storage-driver': 'overlayfs' } });
    expect((await plainNode.dockerOk(['info', '--format', '{{.Driver}}'])).stdout.trim()).toBe('overlayfs');
    const ref = `${proxy.host}/dapp:1`;
    const before = proxy.seen.length;
    await plainNode.dockerOk(['pull', ref], { timeoutMs: 300_000 });
    const seen = proxy.seen.slice(before);
    expect(new Set(blobGets(seen, original.layers).map((l) => l.split('/blobs/')[1])).size).toBe(original.layers.length);
    expect(blobGets(seen, [indexDigest])).toEqual([]);
    const out = await plainNode.dockerOk(['run', '--rm', ref, ...CHECK], { timeoutMs: 180_000 });
    expect(out.stdout).toBe(expected());
  }, 600_000);
});
