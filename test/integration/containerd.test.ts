/**
 * A real containerd 1.6 (Debian) with gear as a proxy snapshotter (lazy pull
 * on, as `gear snapshotter` runs by default):
 * - plain (non-Gear) layers: import an image with `--snapshotter gear`, run a
 *   container on it, remove the image and check that containerd's garbage
 *   collector removed every snapshot from our metadata and every layer dir;
 * - a Gear image: `gear convert` → a real registry (behind a counting proxy,
 *   which the Gear index names as the files' registry) → `ctr image pull`
 *   (containerd's own unpacker extracts the index layer; gear adopts it at
 *   Commit) → `ctr run`, fetching only the files the task opens → image
 *   removal and GC leave no Gear layer, pool reference or catalog entry.
 *
 * containerd gets its own root, state, sockets and config.toml (version 2)
 * under a temp dir (test/helpers/containerd.ts); the machine's default
 * containerd is never touched. Everything started here is stopped by PID and
 * everything mounted under the temp dir is unmounted afterwards.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startGearContainerd, type GearContainerd } from '../helpers/containerd.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { busyboxLayer, tarBuffer, writeDockerArchive } from '../helpers/images.js';
import { busyboxLayer as busyboxEntries, writeDockerArchive as writeEntriesArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const IMAGE = 'docker.io/gear-test/busybox-two-layers:latest';

let c: GearContainerd | undefined;
let base = '';
let gearRoot = '';
let reg: TestRegistry | undefined;
let proxy: FaultProxy | undefined;

const ctrOk = (args: string[], timeoutMs?: number) => c!.ctrOk(args, timeoutMs);

const dirEntries = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((n) => !n.startsWith('.')) : []);

beforeAll(async () => {
  c = await startGearContainerd({ tasks: ['t1', 'lazy1', 'lazy2'] });
  base = c.base;
  gearRoot = c.gearRoot;
}, 120_000);

afterAll(async () => {
  await c?.stop();
  await proxy?.stop();
  await reg?.stop();
}, 180_000);

describe('containerd 1.6 with gear as a proxy snapshotter', () => {
  it('imports, runs and garbage-collects a two-layer image', async () => {
    const second = await tarBuffer([
      { name: 'etc/', type: 'directory', mode: 0o755 },
      { name: 'etc/gear-release', content: 'gear layer two\n', mode: 0o644 },
    ]);
    const archive = join(base, 'image.tar');
    await writeDockerArchive(archive, IMAGE, [await busyboxLayer(), second]);

    await ctrOk(['image', 'import', '--snapshotter', 'gear', archive], 300_000);
    expect(await ctrOk(['image', 'ls', '-q'])).toContain(IMAGE);

    // Both layers were unpacked through us: two committed snapshots.
    const before = await ctrOk(['snapshots', '--snapshotter', 'gear', 'ls']);
    expect(before.split('\n').filter((l) => /\bCommitted\b/.test(l))).toHaveLength(2);
    expect(dirEntries(join(gearRoot, 'snapshotter/snapshots'))).toHaveLength(2);

    const out = await ctrOk(
      ['run', '--snapshotter', 'gear', '--rm', IMAGE, 't1', '/bin/busybox', 'sh', '-c', 'echo hi > /tmp/x && cat /tmp/x && cat /etc/gear-release'],
      180_000,
    );
    expect(out).toBe('hi\ngear layer two\n');

    // The container's active snapshot went with --rm: containerd's metadata
    // forgets it at once, its GC removes it from the backend a little later.
    const activeGone = await waitFor(() => dirEntries(join(gearRoot, 'snapshotter/snapshots')).length === 2, 60_000, 250);
    expect(activeGone, 'the container snapshot was not removed from gear within 60 s').toBe(true);

    await ctrOk(['image', 'rm', '--sync', IMAGE], 120_000);
    // --sync waits for containerd's GC, which removes backend snapshots it no longer tracks.
    const gone = await waitFor(async () => (await ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).trim().split('\n').length <= 1, 60_000, 500);
    expect(gone, await ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).toBe(true);
    expect(dirEntries(join(gearRoot, 'snapshotter/snapshots'))).toEqual([]);
    expect(dirEntries(join(gearRoot, 'layers'))).toEqual([]);
  });
});

describe('a Gear image through containerd 1.6 and gear as a proxy snapshotter', () => {
  const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');
  const files = { a: randomBytes(300_000), b: randomBytes(200_000), unused: randomBytes(300_000) };
  /** GETs of one Gear file's blob seen by the proxy (convert stores files raw: blob digest = content digest). */
  const gets = (content: Buffer) => proxy!.seen.filter((l) => l.startsWith('GET ') && l.includes(`/blobs/sha256:${hex(content)}`)).length;
  const inPool = (content: Buffer) => existsSync(join(gearRoot, 'pool/sha256', hex(content).slice(0, 2), hex(content)));

  it('pulls with containerd\'s unpacker, runs a task fetching only the files it opens, and garbage-collects', async () => {
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    const bb: LayerEntry[] = await busyboxEntries();
    const busybox = bb.find((e) => e.path === 'bin/busybox')!.content as Buffer;
    const src = join(base, 'lazy-src.tar');
    await writeEntriesArchive(src, [
      [...bb, { path: 'data/', type: 'dir' }, ...Object.entries(files).map(([n, c]) => ({ path: `data/${n}`, content: c, mode: 0o644 }))],
    ], 'src/lazy:v1');
    const ref = `${proxy.host}/gear/lazy:v1`;
    await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', `docker-archive:${src}`, ref], { timeoutMs: 300_000 });
    const afterConvert = proxy.seen.length;

    await ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    // containerd fetched the index layer and config, no Gear file.
    expect(proxy.seen.slice(afterConvert).filter((l) => l.startsWith('GET ') && l.includes('/blobs/')).length).toBe(2);
    const snaps = await ctrOk(['snapshots', '--snapshotter', 'gear', 'ls']);
    expect(snaps.split('\n').filter((l) => /\bCommitted\b/.test(l)), snaps).toHaveLength(1);
    // Adopted as a Gear index layer: its metacopy index dir exists.
    const gearLayers = dirEntries(join(gearRoot, 'layers')).filter((id) => existsSync(join(gearRoot, 'layers', id, 'index')));
    expect(gearLayers).toHaveLength(1);

    const out = await ctrOk(
      ['run', '--snapshotter', 'gear', '--rm', ref, 'lazy1', '/bin/busybox', 'sh', '-c', 'sha256sum /data/a /data/b | cut -c1-64; ls /data; stat -c %s /data/unused'],
      180_000,
    );
    expect(out).toBe(`${hex(files.a)}\n${hex(files.b)}\na\nb\nunused\n${files.unused.length}\n`);
    expect(gets(files.a)).toBe(1);
    expect(gets(files.b)).toBe(1);
    expect(gets(busybox)).toBe(1);
    expect(gets(files.unused)).toBe(0); // listed and stat'ed, never opened
    expect(inPool(files.a) && inPool(files.b) && inPool(busybox)).toBe(true);
    expect(inPool(files.unused)).toBe(false);

    // A second task reads from the pool: no new fetch.
    const again = await ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'lazy1', '/bin/busybox', 'sha256sum', '/data/a'], 180_000);
    expect(again.slice(0, 64)).toBe(hex(files.a));
    expect(gets(files.a)).toBe(1);
    expect(gets(busybox)).toBe(1);

    // Image removal: containerd's GC removes the snapshots, gear the layer, its references and catalog entries.
    const snapshotsGone = await waitFor(() => dirEntries(join(gearRoot, 'snapshotter/snapshots')).length === 1, 60_000, 250);
    expect(snapshotsGone, 'the containers\' snapshots were not removed within 60 s').toBe(true);
    await ctrOk(['image', 'rm', '--sync', ref], 120_000);
    const gone = await waitFor(async () => (await ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).trim().split('\n').length <= 1, 60_000, 500);
    expect(gone, await ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).toBe(true);
    expect(dirEntries(join(gearRoot, 'snapshotter/snapshots'))).toEqual([]);
    expect(dirEntries(join(gearRoot, 'layers'))).toEqual([]);
    expect(dirEntries(join(gearRoot, 'pool/.meta/refs')).filter((n) => n.endsWith('.json'))).toEqual([]);
    expect((await ctrOk(['content', 'ls', '-q'])).trim()).toBe('');
  });

  it('after kill -9 of gear snapshotter, a running task reads files it had never opened (crash resume)', async () => {
    expect(proxy, 'needs the registry of the previous case').toBeDefined();
    const ref = `${proxy!.host}/gear/lazy:v1`;
    await ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    await ctrOk(['run', '-d', '--snapshotter', 'gear', ref, 'lazy2', '/bin/busybox', 'sleep', '600'], 180_000);
    try {
      // busybox is in the pool since the previous case; /data/unused was never fetched.
      expect(inPool(files.unused)).toBe(false);
      // The task's overlay (mounted by containerd) keeps the dead miss filesystem as its last
      // data layer; the restarted snapshotter finds the overlay in the mount table and completes
      // the index layer's files into the pool, where overlay looks first.
      await c!.killGear();
      await c!.startGear();
      const resumed = await waitFor(() => inPool(files.unused), 60_000, 250);
      expect(resumed, 'the restarted snapshotter did not complete /data/unused into the pool within 60 s').toBe(true);
      const out = await ctrOk(['task', 'exec', '--exec-id', 'read-unused', 'lazy2', '/bin/busybox', 'sha256sum', '/data/unused'], 60_000);
      expect(out.slice(0, 64)).toBe(hex(files.unused));
    } finally {
      await c!.ctr(['task', 'kill', '-s', 'KILL', 'lazy2'], 20_000);
      await waitFor(async () => (await c!.ctr(['task', 'rm', '-f', 'lazy2'], 20_000)).code === 0, 20_000, 250);
      await c!.ctr(['container', 'rm', 'lazy2'], 20_000);
    }
  });
});
