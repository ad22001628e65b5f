/**
 * Gear index layers in the layer store, with the real lazy path: registry →
 * fetcher → pool / miss filesystem (FUSE) → overlay metacopy mounts.
 * Needs root, /dev/fuse, overlayfs with data-only layers (Linux 6.5+).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { indexTarHeader } from './fixtures/tarbuild.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import type { ResumeQueue } from '../../src/core/lazy/resume.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { getXattr } from '../../src/core/sys/xattr.js';
import { isMountPoint, mountsUnder } from '../../src/core/sys/mounts.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { run } from '../helpers/proc.js';

const REPO = 'gear-test/lazy';
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const hdr = indexTarHeader;

let reg: TestRegistry;
let proxy: FaultProxy;
const files: Record<string, Buffer> = {
  'bin/tool': randomBytes(200_000),
  'etc/os-release': Buffer.from('NAME=gear-test\n'),
  'etc/shared': Buffer.from('same content\n'),
  'usr/share/doc': Buffer.from('documentation '.repeat(1000)),
};
let indexTar: Buffer;
let indexManifest: IndexManifest;
/** The same index in format version 2 (the tree inside the manifest, one tar entry). */
let indexTarV2: Buffer;
let indexEntries: TarHeader[];
async function tarOf(manifest: IndexManifest, entries: TarHeader[]): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, entries)) chunks.push(c);
  return Buffer.concat(chunks);
}

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const pusher = new RegistryClient();
  try {
    for (const c of Object.values(files)) await pusher.pushBlob(`${reg.host}/${REPO}`, sha(c), c);
  } finally {
    await pusher.close();
  }
  const manifest: IndexManifest = {
    version: 1,
    location: { registry: proxy.host, repository: REPO },
    files: [
      { path: 'bin/tool', digest: sha(files['bin/tool']!), size: files['bin/tool']!.length },
      { path: 'etc/os-release', digest: sha(files['etc/os-release']!), size: files['etc/os-release']!.length },
      { path: 'etc/shared', digest: sha(files['etc/shared']!), size: files['etc/shared']!.length },
      { path: 'usr/share/doc', digest: sha(files['usr/share/doc']!), size: files['usr/share/doc']!.length },
    ],
  };
  const entries = [
    hdr('bin', 'dir'),
    hdr('bin/tool', 'file', { mode: 0o4755, uid: 12, gid: 34 }),
    hdr('etc', 'dir'),
    hdr('etc/empty', 'file'),
    hdr('etc/link', 'symlink', { linkname: 'os-release' }),
    hdr('etc/os-release', 'file'),
    hdr('etc/shared', 'file'),
    hdr('etc/shared2', 'link', { linkname: 'etc/shared' }),
    hdr('usr', 'dir'),
    hdr('usr/share', 'dir'),
    hdr('usr/share/doc', 'file', { mode: 0o600 }),
  ];
  indexManifest = manifest;
  indexEntries = entries;
  indexTar = await tarOf(manifest, entries);
  indexTarV2 = await tarOf({ ...manifest, version: 2 }, entries);
}, 60_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
});

let root: string;
const blobGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:'));

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-lazy-'));
  proxy.setDecider(() => undefined);
});

afterEach(async () => {
  // overlays first, then the miss filesystem (the store's close)
  for (const m of mountsUnder(path.join(root, 'layers'))) await run('umount', ['-l', m.mountPoint]);
  for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
  await fs.rm(root, { recursive: true, force: true });
});

describe('gear index layers in the store', () => {
  it('a pull ends before its index image is written; a Get above waits for it, and a crash in between is repaired at the next open', async () => {
    const opts = { root, indexForm: 'image' as const, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB' } };
    const image = path.join(root, 'layers/idx/index.erofs');
    const idx = path.join(root, 'layers/idx/index');
    let store = await openLayerStore(opts);
    try {
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([indexTarV2]), { deferIndexImage: true }); // as the graph driver does
      await store.create('ctr', 'idx', 'rw');
      const merged = await store.get('ctr'); // waits for the image, then mounts it under the overlay
      expect(mountsUnder(idx).map((m) => m.fsType)).toEqual(['erofs']);
      expect(await fs.readFile(path.join(merged, 'etc/os-release'))).toEqual(files['etc/os-release']);
      await store.put('ctr');
    } finally {
      await store.close?.();
    }
    // The state a kill -9 right after ApplyDiff leaves: the layer recorded, its image never written.
    for (const m of mountsUnder(path.join(root, 'layers'))) await run('umount', ['-l', m.mountPoint]);
    for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
    await fs.rm(image);
    expect(existsSync(path.join(root, 'layers/idx/index.tar'))).toBe(true);
    store = await openLayerStore(opts);
    try {
      expect(existsSync(image)).toBe(true);
      expect(mountsUnder(idx).map((m) => m.fsType)).toEqual(['erofs']);
      const merged = await store.get('ctr');
      expect((await fs.stat(path.join(merged, 'bin/tool'))).size).toBe(files['bin/tool']!.length);
      expect(await fs.readFile(path.join(merged, 'usr/share/doc'))).toEqual(files['usr/share/doc']);
      await store.put('ctr');
    } finally {
      await store.close?.();
    }
  });

  it.each([
    ['image', 1],
    ['dir', 1],
    ['image', 2],
    ['dir', 2],
  ] as const)('keeps the index form in diff/, builds the index (%s form, format version %i) with metacopy files, and reads lazily through FUSE', async (form, version) => {
    const store = await openLayerStore({ root, indexForm: form, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB' } });
    try {
      await store.create('idx', '', 'ro');
      const tar = version === 1 ? indexTar : indexTarV2;
      await store.applyDiff('idx', '', Readable.from([tar]));
      // Get() of the index layer: the index form (tar-split reproduces the layer from it).
      const view = await store.get('idx');
      expect(view).toBe(path.join(root, 'layers/idx/diff'));
      expect(existsSync(path.join(view, '.gear/index.json'))).toBe(true);
      if (version === 1) expect((await fs.stat(path.join(view, 'bin/tool'))).size).toBe(0);
      else expect(await fs.readdir(view)).toEqual(['.gear']); // the tree is in the manifest
      await store.put('idx');

      const idx = path.join(root, 'layers/idx/index');
      expect(existsSync(path.join(idx, '.gear'))).toBe(false);
      const st = await fs.lstat(path.join(idx, 'bin/tool'));
      expect(st.size).toBe(files['bin/tool']!.length);
      const image = path.join(root, 'layers/idx/index.erofs');
      if (form === 'dir') {
        expect(st.blocks).toBeLessThanOrEqual(8); // no data blocks (an ext4 xattr block may count)
        expect(existsSync(image)).toBe(false);
        expect(isMountPoint(idx)).toBe(false);
      } else {
        // One small image file holds the whole index, mounted read-only at index/.
        expect((await fs.stat(image)).size).toBeLessThanOrEqual(4 * 4096);
        expect(mountsUnder(idx).map((m) => m.fsType)).toEqual(['erofs']);
        expect(Object.fromEntries(await store.status())['Index Form']).toMatch(/^EROFS image/);
        await expect(fs.writeFile(path.join(idx, 'etc/new'), 'x')).rejects.toMatchObject({ code: 'EROFS' });
      }
      expect(st.mode & 0o7777).toBe(0o4755);
      expect([st.uid, st.gid]).toEqual([12, 34]);
      expect(getXattr(path.join(idx, 'bin/tool'), 'trusted.overlay.metacopy')).toEqual(Buffer.alloc(0));
      expect(getXattr(path.join(idx, 'bin/tool'), 'trusted.overlay.redirect')?.toString()).toMatch(/^\/sha256\/[0-9a-f]{2}\/[0-9a-f]{64}$/);
      expect((await fs.lstat(path.join(idx, 'etc/shared2'))).ino).toBe((await fs.lstat(path.join(idx, 'etc/shared'))).ino);
      expect(await fs.readlink(path.join(root, 'l', (JSON.parse(await fs.readFile(path.join(root, 'layers/idx/layer.json'), 'utf8')) as { link: string }).link))).toBe('../layers/idx/index');

      await store.create('ctr', 'idx', 'rw');
      const merged = await store.get('ctr');
      expect(isMountPoint(merged)).toBe(true);
      const before = blobGets().length;
      // stat and ls never fetch
      expect((await fs.stat(path.join(merged, 'usr/share/doc'))).size).toBe(files['usr/share/doc']!.length);
      expect(blobGets().length).toBe(before);
      expect(await fs.readFile(path.join(merged, 'etc/os-release'))).toEqual(files['etc/os-release']);
      expect(await fs.readFile(path.join(merged, 'etc/link'))).toEqual(files['etc/os-release']);
      expect(await fs.readFile(path.join(merged, 'bin/tool'))).toEqual(files['bin/tool']);
      expect(await fs.readFile(path.join(merged, 'etc/shared2'))).toEqual(files['etc/shared']);
      expect(blobGets().length - before).toBe(3); // os-release, tool, shared; not doc
      // A second open comes from the pool.
      expect(await fs.readFile(path.join(merged, 'bin/tool'))).toEqual(files['bin/tool']);
      expect(blobGets().length - before).toBe(3);
      // Writes copy up.
      await fs.appendFile(path.join(merged, 'etc/os-release'), 'X=1\n');
      expect(await fs.readFile(path.join(root, 'layers/ctr/diff/etc/os-release'), 'utf8')).toBe('NAME=gear-test\nX=1\n');
      const status = Object.fromEntries(await store.status());
      expect(status['Fetched Files']).toBe('3');
      expect(status['Index Layers']).toBe('1');
      await store.put('ctr');
      expect(isMountPoint(merged)).toBe(false);

      await store.remove('ctr');
      await store.remove('idx');
      expect((await fs.readdir(path.join(root, 'pool/.meta/refs'))).filter((n) => n.endsWith('.json'))).toEqual([]);
      expect(mountsUnder(path.join(root, 'layers'))).toEqual([]);
      expect(await fs.readdir(path.join(root, 'layers'))).toEqual([]);
    } finally {
      await store.close?.();
    }
    expect(isMountPoint(path.join(root, 'miss'))).toBe(false);
  });

  it('the periodic pool scrub removes a file altered at rest, and the next open through a new mount fetches it again', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB', scrubInterval: '150ms', scrubRate: '64MiB' } });
    try {
      const status = Object.fromEntries(await store.status());
      expect(status['Pool Integrity']).toMatch(/^scrub every 150ms at 64\.0MiB\/s \(fs-verity: /);
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([indexTar]));
      await store.create('c1', 'idx', 'rw');
      const m1 = await store.get('c1');
      const tool = files['bin/tool']!;
      const gets = () => blobGets().filter((l) => l.includes(sha(tool))).length;
      const before = gets();
      expect(await fs.readFile(path.join(m1, 'bin/tool'))).toEqual(tool);
      expect(gets()).toBe(before + 1);
      await store.put('c1');
      // Altered in place behind the daemon's back.
      const poolFile = path.join(root, 'pool/sha256', sha(tool).slice(7, 9), sha(tool).slice(7));
      const bad = Buffer.from(tool);
      bad[4242] ^= 0x80;
      await fs.writeFile(poolFile, bad);
      const scrubber = store.lazyRuntime!.scrubber;
      for (let i = 0; i < 250 && scrubber.stats().totals.removed < 1; i++) await new Promise((r) => setTimeout(r, 20));
      expect(scrubber.stats().totals).toMatchObject({ bad: 1, removed: 1 });
      expect(existsSync(poolFile)).toBe(false);
      await store.create('c2', 'idx', 'rw');
      const m2 = await store.get('c2');
      expect(await fs.readFile(path.join(m2, 'bin/tool'))).toEqual(tool);
      expect(gets()).toBe(before + 2);
      await store.put('c2');
      // The scrub keeps running every 150 ms: a run in progress, or the last one with the totals.
      expect(Object.fromEntries(await store.status())['Pool Scrub']).toMatch(/^running since |since first run: 1 bad, 1 removed/);
      expect(scrubber.stats().totals).toMatchObject({ bad: 1, removed: 1 });
    } finally {
      await store.close?.();
    }
  });

  it('pool references written in the background after ApplyDiff are rewritten at the next start when a crash lost them', async () => {
    const refsDir = path.join(root, 'pool/.meta/refs');
    const refsFiles = async () => (await fs.readdir(refsDir)).filter((n) => n.endsWith('.json'));
    let store = await openLayerStore({ root, lazy: {} });
    try {
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([indexTarV2]));
    } finally {
      await store.close?.(); // waits for the background write
    }
    const [file] = await refsFiles();
    expect(file).toBeDefined();
    const want = JSON.parse(await fs.readFile(path.join(refsDir, file!), 'utf8')) as { owner: string; digests: string[] };
    expect(want.owner).toBe('idx');
    expect([...want.digests].sort()).toEqual([...new Set(indexManifest.files.map((f) => f.digest))].sort());
    // As if the daemon died before the write: the layer record exists, its references do not.
    await fs.rm(path.join(refsDir, file!));
    store = await openLayerStore({ root, lazy: {} });
    try {
      expect(await refsFiles()).toEqual([file]);
      expect(JSON.parse(await fs.readFile(path.join(refsDir, file!), 'utf8'))).toEqual(want);
      await store.remove('idx');
      expect(await refsFiles()).toEqual([]);
    } finally {
      await store.close?.();
    }
  });

  it('fails an uncached read with EIO within the deadline when the registry hangs; cached files still read', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 1_500 } });
    try {
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([indexTar]));
      await store.create('ctr', 'idx', 'rw');
      const merged = await store.get('ctr');
      expect(await fs.readFile(path.join(merged, 'etc/os-release'))).toEqual(files['etc/os-release']);
      proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'hang' } : undefined));
      const t0 = Date.now();
      // In a child process: a reader blocked in the kernel must not block this event loop (it serves FUSE).
      const r = await run('cat', [path.join(merged, 'usr/share/doc')], { timeoutMs: 20_000 });
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Input\/output error/);
      expect(Date.now() - t0).toBeLessThan(8_000);
      expect(await fs.readFile(path.join(merged, 'etc/os-release'))).toEqual(files['etc/os-release']);
      // Flipped bytes: rejected, never in the pool, EIO.
      proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'flip' } : undefined));
      const r2 = await run('cat', [path.join(merged, 'bin/tool')], { timeoutMs: 20_000 });
      expect(r2.stderr).toMatch(/Input\/output error/);
      expect(existsSync(path.join(root, 'pool/sha256', sha(files['bin/tool']!).slice(7, 9), sha(files['bin/tool']!).slice(7)))).toBe(false);
      // Registry healthy again: the next open succeeds.
      proxy.setDecider(() => undefined);
      const r3 = await run('sha256sum', [path.join(merged, 'bin/tool')], { timeoutMs: 20_000 });
      expect(r3.stdout.split(' ')[0]).toBe(sha(files['bin/tool']!).slice(7));
      await store.put('ctr');
    } finally {
      await store.close?.();
    }
  });

  it('prefetches the files the index lists, in the background, so that containers find them in the pool', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB' } });
    try {
      const tar = await tarOf({ ...indexManifest, prefetch: ['usr/share/doc', 'bin/tool'] }, indexEntries);
      const before = blobGets().length;
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([tar]));
      // ApplyDiff answers before the prefetch asks the registry for anything (it is planned on the next turn).
      expect(blobGets().length).toBe(before);
      await store.prefetch!.done('idx');
      const fetched = blobGets().slice(before);
      expect(fetched.length).toBe(2);
      expect(fetched.some((l) => l.includes(sha(files['usr/share/doc']!)))).toBe(true);
      expect(fetched.some((l) => l.includes(sha(files['bin/tool']!)))).toBe(true);
      expect(Object.fromEntries(await store.status())['Prefetch']).toBe('2 of 2 listed files in the pool (1 index layers)');
      // A container opens them without another request; an unlisted file is still fetched lazily.
      await store.create('ctr', 'idx', 'rw');
      const merged = await store.get('ctr');
      expect(await fs.readFile(path.join(merged, 'usr/share/doc'))).toEqual(files['usr/share/doc']);
      expect(await fs.readFile(path.join(merged, 'bin/tool'))).toEqual(files['bin/tool']);
      expect(blobGets().length - before).toBe(2);
      expect(await fs.readFile(path.join(merged, 'etc/os-release'))).toEqual(files['etc/os-release']);
      expect(blobGets().length - before).toBe(3);
      // gear stats: the prefetch fetched 2 of 2 listed; overlay read those 2 from the pool by itself (never
      // seen by gear, so not "needed from the pool"), and the read of the unlisted one fetched it.
      const s1 = store.stats.report().layers.find((l) => l.id === 'idx')!;
      expect(s1.prefetch).toEqual({ state: 'done', listed: 2, cached: 0, fetched: 2, failed: 0, skipped: 0 });
      expect(s1.fromRegistry.files).toBe(3);
      expect(s1.neededFromPool.files).toBe(0);
      expect(s1.neededFromRegistry.files).toBe(1);
      expect(s1.containers).toBe(1);
      await store.put('ctr');
      // A second index listing files already in the pool fetches nothing.
      await store.create('idx2', '', 'ro');
      await store.applyDiff('idx2', '', Readable.from([tar]));
      await store.prefetch!.done('idx2');
      expect(blobGets().length - before).toBe(3);
      expect(store.stats.report().layers.find((l) => l.id === 'idx2')!.prefetch).toMatchObject({ state: 'done', listed: 2, cached: 2, fetched: 0 });
    } finally {
      await store.close?.();
    }
  });

  it('a container created on an image makes its cached files the most recently used of the pool (overlay reads never reach gear)', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB' } });
    try {
      const tar = await tarOf({ ...indexManifest, prefetch: ['usr/share/doc', 'bin/tool'] }, indexEntries);
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([tar]));
      await store.prefetch!.done('idx');
      const pool = store.lazyRuntime!.pool;
      // A file of no image, cached after the image's files: the most recent one.
      const other = randomBytes(1000);
      await new Promise((r) => setTimeout(r, 5));
      await pool.addBuffer(sha(other), other);
      const order = () => pool.list().map((e) => e.digest);
      expect(order().at(-1)).toBe(sha(other));
      await new Promise((r) => setTimeout(r, 5));
      const created = store.admitContainer!('ctr', 'idx');
      created?.();
      expect(order()).toEqual([sha(other), ...[sha(files['usr/share/doc']!), sha(files['bin/tool']!)].sort()]);
    } finally {
      await store.close?.();
    }
  });

  it('with background fetch on, a pulled index layer is completed into the pool; docker info says so', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB', backgroundFetch: true } });
    try {
      const before = blobGets().length;
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([indexTar]));
      const pool = store.lazyRuntime!.pool;
      const all = Object.values(files).map(sha);
      for (let i = 0; i < 200 && !all.every((d) => pool.has(d)); i++) await new Promise((r) => setTimeout(r, 100));
      expect(all.filter((d) => !pool.has(d))).toEqual([]);
      expect(blobGets().length - before).toBe(4); // format v1: one request per file
      expect(Object.fromEntries(await store.status())['Background Fetch']).toMatch(/^on: 4 of 4 missing files in the pool \(4 fetched in the background/);
    } finally {
      await store.close?.();
    }
  });

  it('a layer that fails after its manifest leaves no prefetch and no catalog entry behind', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 10_000 } });
    try {
      const bad = await tarOf({ ...indexManifest, prefetch: ['etc/os-release'] }, [hdr('.wh.x', 'file'), ...indexEntries]);
      await store.create('idx', '', 'ro');
      await expect(store.applyDiff('idx', '', Readable.from([bad]))).rejects.toThrow(/whiteout/);
      expect(store.lazyRuntime!.catalog.owners).toBe(0);
      expect(Object.fromEntries(await store.status())['Prefetch']).toMatch(/^none/);
      expect(existsSync(path.join(root, 'layers/idx/index.erofs'))).toBe(false);
      expect(mountsUnder(path.join(root, 'layers'))).toEqual([]);
    } finally {
      await store.close?.();
    }
  });

  it('after the store is closed and opened again, a container mounted before reads files it never opened (crash resume)', async () => {
    const lazy = { fetchTimeoutMs: 10_000, cacheSize: '64MiB' };
    const store = await openLayerStore({ root, lazy });
    let merged: string;
    try {
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([indexTar]));
      await store.create('ctr', 'idx', 'rw');
      merged = await store.get('ctr'); // a running container: stays mounted across the restart
      await store.create('other', '', 'rw'); // a mounted layer without an index below: nothing to resume
      await store.get('other');
      expect(Object.fromEntries(await store.status())['Resume']).toMatch(/^none/);
    } finally {
      await store.close?.();
    }
    expect(isMountPoint(merged)).toBe(true);
    const doc = path.join(merged, 'usr/share/doc');
    // The miss filesystem that overlay knows is gone: an uncached file cannot be opened (in a child: may block).
    const dead = await run('cat', [doc], { timeoutMs: 20_000 });
    expect(dead.code).not.toBe(0);
    expect(dead.stderr).toMatch(/Transport endpoint is not connected|Input\/output error|Software caused connection abort/);

    const before = blobGets().length;
    const again = await openLayerStore({ root, lazy });
    try {
      const resume = (again as unknown as { resumeQueue?: ResumeQueue }).resumeQueue;
      expect(resume).toBeDefined();
      await resume!.done;
      // 4 distinct files (etc/empty is empty, etc/shared2 a hard link), all fetched once, in the background
      expect(resume!.current).toMatchObject({ state: 'done', fetched: 4, failed: 0 });
      expect(blobGets().length - before).toBe(4);
      expect(Object.fromEntries(await again.status())['Resume']).toMatch(/^4 of 4 files in the pool \(1 index layers in use at start\), done in/);
      // Opened for the first time, through the old overlay: found in the pool.
      const r = await run('cat', [doc], { timeoutMs: 20_000 });
      expect(r.code).toBe(0);
      expect(await fs.readFile(doc)).toEqual(files['usr/share/doc']);
      expect(await fs.readFile(path.join(merged, 'bin/tool'))).toEqual(files['bin/tool']);
      // The adopted mount is released as one reference.
      await again.put('ctr');
      expect(isMountPoint(merged)).toBe(false);
      await again.put('other');
    } finally {
      await again.close?.();
    }
  });
});

describe('index layers applied straight from the tar', () => {
  const digest = `sha256:${'ab'.repeat(32)}`;
  async function layerOf(entries: TarHeader[], listed: string[] = []): Promise<Buffer> {
    const manifest: IndexManifest = { version: 1, files: listed.map((p) => ({ path: p, digest, size: 1234 })) };
    const chunks: Buffer[] = [];
    for await (const c of writeIndexLayer(manifest, entries)) chunks.push(c);
    return Buffer.concat(chunks);
  }

  it('after a crash mid-ApplyDiff with the index image mounted, the next open removes the layer and its mount; a complete one is remounted', async () => {
    const store = await openLayerStore({ root, indexForm: 'image' });
    await store.create('done', '', 'ro');
    await store.applyDiff('done', '', Readable.from([indexTar]));
    await store.create('half', '', 'ro');
    await store.applyDiff('half', '', Readable.from([indexTar]));
    await store.close?.();
    // What a kill -9 before the record was final leaves: the marker, the image, its mount.
    await fs.writeFile(path.join(root, 'layers/half/applying'), '');
    expect(mountsUnder(path.join(root, 'layers/half')).map((m) => m.fsType)).toEqual(['erofs']);
    // And a complete layer whose mount is gone (a reboot): remounted at open.
    await run('umount', [path.join(root, 'layers/done/index')]);
    const again = await openLayerStore({ root, indexForm: 'image' });
    try {
      expect(await again.exists('half')).toBe(false);
      expect(existsSync(path.join(root, 'layers/half'))).toBe(false);
      expect(mountsUnder(path.join(root, 'layers')).map((m) => path.relative(root, m.mountPoint))).toEqual(['layers/done/index']);
      expect((await fs.lstat(path.join(root, 'layers/done/index/bin/tool'))).size).toBe(files['bin/tool']!.length);
    } finally {
      await again.close?.();
    }
  });

  it('builds index/ only; the index form appears on the first Get(), also after a crash while extracting it', async () => {
    const tar = await layerOf(
      [hdr('d', 'dir', { mode: 0o711 }), hdr('d/f', 'file', { xattrs: new Map([['trusted.overlay.redirect', Buffer.from('/etc/shadow')], ['user.keep', Buffer.from('v')]]) })],
      ['d/f'],
    );
    let store = await openLayerStore({ root });
    await store.create('idx', '', 'ro');
    const size = await store.applyDiff('idx', '', Readable.from([tar]));
    expect(size).toBeGreaterThan(0); // the manifest's bytes, as for any layer: regular-file content
    expect(await fs.readdir(path.join(root, 'layers/idx/diff'))).toEqual([]);
    const f = path.join(root, 'layers/idx/index/d/f');
    expect(getXattr(f, 'trusted.overlay.redirect')?.toString()).toBe(`/sha256/ab/${'ab'.repeat(32)}`);
    expect(getXattr(f, 'user.keep')?.toString()).toBe('v');
    expect((await fs.lstat(path.join(root, 'layers/idx/index/d'))).mode & 0o7777).toBe(0o711);
    // A crash while the index form was being extracted.
    await fs.mkdir(path.join(root, 'layers/idx/diff.tmp/junk'), { recursive: true });
    await store.close?.();
    store = await openLayerStore({ root });
    const view = await store.get('idx');
    expect(view).toBe(path.join(root, 'layers/idx/diff'));
    expect((await fs.readdir(view)).sort()).toEqual(['.gear', 'd']);
    expect((await fs.lstat(path.join(view, 'd/f'))).size).toBe(0);
    expect(getXattr(path.join(view, 'd/f'), 'trusted.overlay.redirect')).toBeNull();
    expect(existsSync(path.join(root, 'layers/idx/index.tar'))).toBe(false);
    expect(existsSync(path.join(root, 'layers/idx/diff.tmp'))).toBe(false);
    await store.put('idx');
    await store.close?.();
  });

  it.each([
    ['a symlink as a parent', [hdr('a', 'symlink', { linkname: '/tmp' }), hdr('a/escape', 'file')], /not a directory/],
    ['a file as a parent', [hdr('a', 'file'), hdr('a/b', 'file')], /not a directory/],
    ['a whiteout', [hdr('.wh.etc', 'file')], /whiteout/],
    ['a device number out of range', [hdr('c', 'char', { devmajor: 0x1000 })], /entry "c": devmajor 4096 is beyond 4095, the largest major number Linux stores/],
  ])('refuses %s and leaves nothing behind', async (_what, entries, re) => {
    const store = await openLayerStore({ root });
    await store.create('idx', '', 'ro');
    await expect(store.applyDiff('idx', '', Readable.from([await layerOf(entries)]))).rejects.toThrow(re);
    expect(existsSync(path.join(root, 'layers/idx/index'))).toBe(false);
    expect(existsSync(path.join(root, 'layers/idx/index.tar'))).toBe(false);
    expect(existsSync('/tmp/escape')).toBe(false);
    await store.close?.();
  });
});
