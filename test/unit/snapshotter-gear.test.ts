/**
 * Gear index layers through the containerd snapshotter's model, with the real
 * core store and lazy path (registry → fetcher → pool / miss filesystem) and
 * real overlay mounts. containerd's applier is played by GNU tar extracting
 * the index layer tar into the bind-mounted snapshot dir, which is exactly
 * what containerd sees of a parentless snapshot.
 *
 * The overlays are mounted by mount(8) in a child process: this process
 * serves the miss filesystem, which overlay queries while mounting.
 * Needs root, /dev/fuse, overlayfs with data-only layers (Linux 6.5+).
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { indexTarHeader } from './fixtures/tarbuild.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { Snapshotter, type MountSpec } from '../../src/frontends/snapshotter/snapshotter.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { run } from '../helpers/proc.js';

const REPO = 'gear-test/snap';
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

const hdr = indexTarHeader;

let reg: TestRegistry;
let proxy: FaultProxy;
const files: Record<string, Buffer> = {
  'bin/tool': randomBytes(200_000),
  'etc/os-release': Buffer.from('NAME=gear-snap\n'),
  'usr/doc': randomBytes(50_000),
};
let manifest: IndexManifest;
let work: string;
let indexTarFile: string;
/** The same index in format version 2 (the tree inside the manifest). */
let indexTarFileV2: string;

async function tarOf(m: IndexManifest, entries: TarHeader[]): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(m, entries)) chunks.push(c);
  return Buffer.concat(chunks);
}

const treeEntries = () => [
  hdr('bin', 'dir'),
  hdr('bin/tool', 'file', { mode: 0o755 }),
  hdr('etc', 'dir'),
  hdr('etc/os-release', 'file'),
  hdr('usr', 'dir'),
  hdr('usr/doc', 'file'),
];

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const pusher = new RegistryClient();
  try {
    for (const c of Object.values(files)) await pusher.pushBlob(`${reg.host}/${REPO}`, sha(c), c);
  } finally {
    await pusher.close();
  }
  manifest = {
    version: 1,
    location: { registry: proxy.host, repository: REPO },
    files: Object.entries(files)
      .map(([p, c]) => ({ path: p, digest: sha(c), size: c.length }))
      .sort((a, b) => (a.path < b.path ? -1 : 1)),
  };
  work = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-snap-tars-'));
  indexTarFile = path.join(work, 'index.tar');
  await fs.writeFile(indexTarFile, await tarOf(manifest, treeEntries()));
  indexTarFileV2 = path.join(work, 'index-v2.tar');
  await fs.writeFile(indexTarFileV2, await tarOf({ ...manifest, version: 2 }, treeEntries()));
}, 60_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
  if (work) await fs.rm(work, { recursive: true, force: true });
});

let root: string;
const blobGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:'));

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-snap-'));
});

afterEach(async () => {
  for (const m of mountsUnder(root).reverse()) await run('umount', ['-l', m.mountPoint]);
  await fs.rm(root, { recursive: true, force: true });
});

/** What containerd does with a parentless snapshot's mounts: bind it, untar into it. */
async function extractInto(mounts: MountSpec[], tarFile: string): Promise<void> {
  expect(mounts).toHaveLength(1);
  expect(mounts[0]!.type).toBe('bind');
  const r = await run('tar', ['-xpf', tarFile, '--same-owner', '--xattrs', '-C', mounts[0]!.source]);
  expect(r.code, r.stderr).toBe(0);
}

/** Performs a returned mount as containerd would (mount(8) in a child). */
async function mountSpec(m: MountSpec, target: string): Promise<void> {
  await fs.mkdir(target, { recursive: true });
  const r = await run('mount', ['-t', m.type, '-o', m.options.join(','), m.source, target], { timeoutMs: 30_000 });
  expect(r.code, r.stderr).toBe(0);
}

const cat = async (p: string) => {
  const r = await run('cat', [p], { timeoutMs: 30_000 });
  expect(r.code, r.stderr).toBe(0);
  return r.stdout;
};
const sha256sum = async (p: string) => {
  const r = await run('sha256sum', [p], { timeoutMs: 30_000 });
  expect(r.code, r.stderr).toBe(0);
  return `sha256:${r.stdout.split(' ')[0]}`;
};
const refFiles = async () =>
  existsSync(path.join(root, 'pool/.meta/refs')) ? (await fs.readdir(path.join(root, 'pool/.meta/refs'))).filter((n) => n.endsWith('.json')) : [];

describe('gear index layers in the containerd snapshotter', () => {
  it.each([[1], [2]])('commits an extracted Gear index (format version %i) as a lazy layer and mounts containers and views on it through pool and miss', async (version) => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 10_000, cacheSize: '64MiB' } });
    try {
      const sn = await Snapshotter.open({ layers: store, metaRoot: path.join(root, 'snapshotter') });
      await extractInto(await sn.prepare('extract-1 sha256:x', ''), version === 1 ? indexTarFile : indexTarFileV2);
      // What containerd unpacked: the tree (version 1), or only the manifest (version 2).
      const unpacked = (await fs.readdir(path.join(root, 'layers'))).map((l) => path.join(root, 'layers', l, 'diff')).find((d) => existsSync(path.join(d, '.gear')))!;
      expect((await fs.readdir(unpacked)).sort()).toEqual(version === 1 ? ['.gear', 'bin', 'etc', 'usr'] : ['.gear']);
      await sn.commit('sha256:x', 'extract-1 sha256:x');

      const base = (await sn.list([])).find((i) => i.name === 'sha256:x');
      expect(base?.kind).toBe('committed');
      const layer = (await fs.readdir(path.join(root, 'snapshotter/snapshots')))[0]!.replace(/\.json$/, '');
      expect(store.lowerOf(layer).gear).toBe(true);
      expect(store.lowerOf(layer).dir).toBe(path.join(root, 'layers', layer, 'index'));
      expect(await fs.readlink(store.lowerOf(layer).short)).toBe(`../layers/${layer}/index`);
      expect(existsSync(path.join(root, 'layers', layer, 'index/.gear'))).toBe(false);
      expect((await fs.lstat(path.join(root, 'layers', layer, 'index/bin/tool'))).size).toBe(files['bin/tool']!.length);
      // The adopted index is one EROFS image, mounted at index/ (no second inode per entry).
      expect(mountsUnder(path.join(root, 'layers', layer, 'index')).map((x) => x.fsType)).toEqual(['erofs']);
      expect(existsSync(path.join(root, 'layers', layer, 'index.erofs'))).toBe(true);
      expect(store.lazyRuntime?.catalog.files).toBe(3);
      expect(await refFiles()).toHaveLength(1);

      // A container on it: overlay with the data-only lowers, metacopy options, absolute paths.
      const [m] = await sn.prepare('ctr', 'sha256:x');
      expect(m!.type).toBe('overlay');
      expect(m!.options).toEqual(
        expect.arrayContaining([
          'metacopy=on',
          'redirect_dir=on',
          'index=off',
          `lowerdir=${store.lowerOf(layer).short}::${root}/pool::${root}/miss`,
        ]),
      );
      expect(m!.options.find((o) => o.startsWith('upperdir='))).toMatch(new RegExp(`^upperdir=${root}/layers/[0-9a-f]+/diff$`));
      const merged = path.join(root, 'mnt-ctr');
      await mountSpec(m!, merged);
      const before = blobGets().length;
      expect((await fs.stat(path.join(merged, 'usr/doc'))).size).toBe(files['usr/doc']!.length); // stat never fetches
      expect(blobGets().length).toBe(before);
      expect(await cat(path.join(merged, 'etc/os-release'))).toBe(files['etc/os-release']!.toString());
      expect(await sha256sum(path.join(merged, 'bin/tool'))).toBe(sha(files['bin/tool']!));
      expect(blobGets().length - before).toBe(2); // not usr/doc
      expect(await sha256sum(path.join(merged, 'bin/tool'))).toBe(sha(files['bin/tool']!)); // from the pool now
      expect(blobGets().length - before).toBe(2);
      const w = await run('sh', ['-c', `echo X=1 >> ${merged}/etc/os-release`]);
      expect(w.code, w.stderr).toBe(0);
      expect(await cat(path.join(merged, 'etc/os-release'))).toBe('NAME=gear-snap\nX=1\n');

      // A view with the Gear layer as its only parent: a read-only overlay, not a bind of the index form.
      const [v] = await sn.view('view', 'sha256:x');
      expect(v!.type).toBe('overlay');
      expect(v!.options[0]).toBe('ro');
      expect(v!.options.some((o) => o.startsWith('upperdir='))).toBe(false);
      const viewDir = path.join(root, 'mnt-view');
      await mountSpec(v!, viewDir);
      expect(existsSync(path.join(viewDir, '.gear'))).toBe(false);
      expect(await cat(path.join(viewDir, 'etc/os-release'))).toBe(files['etc/os-release']!.toString());
      expect(await sha256sum(path.join(viewDir, 'usr/doc'))).toBe(sha(files['usr/doc']!));
      expect(blobGets().length - before).toBe(3);

      // A metadata-only copy-up (chmod of a lower file), committed, and a container on top of that:
      // the committed layer's metacopy file keeps taking its data through the index layer.
      expect((await run('chmod', ['0700', path.join(merged, 'usr/doc')])).code).toBe(0);
      expect((await run('umount', [merged])).code).toBe(0);
      await sn.commit('sha256:y', 'ctr');
      const [m2] = await sn.prepare('ctr2', 'sha256:y');
      expect(m2!.options.find((o) => o.startsWith('lowerdir='))).toMatch(/^lowerdir=[^:]+\/l\/[A-Z0-9]+:[^:]+\/l\/[A-Z0-9]+::/);
      const merged2 = path.join(root, 'mnt-ctr2');
      await mountSpec(m2!, merged2);
      expect((await fs.stat(path.join(merged2, 'usr/doc'))).mode & 0o777).toBe(0o700);
      expect(await sha256sum(path.join(merged2, 'usr/doc'))).toBe(sha(files['usr/doc']!));
      expect(await cat(path.join(merged2, 'etc/os-release'))).toBe('NAME=gear-snap\nX=1\n');
      expect((await run('umount', [merged2])).code).toBe(0);
      await sn.remove('ctr2');

      // Removal, as containerd's GC does it: children first; the references go with the Gear layer.
      expect((await run('umount', [viewDir])).code).toBe(0);
      await sn.remove('sha256:y');
      await sn.remove('view');
      expect(await refFiles()).toHaveLength(1);
      await sn.remove('sha256:x');
      expect(await refFiles()).toEqual([]);
      expect(store.lazyRuntime?.catalog.files).toBe(0);
      expect((await fs.readdir(path.join(root, 'layers'))).filter((n) => !n.startsWith('.'))).toEqual([]);
    } finally {
      await store.close?.();
    }
  });

  it('keeps plain base layers plain, and refuses an invalid Gear index at Commit leaving nothing built', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 5_000 } });
    try {
      const sn = await Snapshotter.open({ layers: store, metaRoot: path.join(root, 'snapshotter') });

      // Plain: a committed base layer without .gear/index.json stays a bind for views.
      const [p] = await sn.prepare('plain-extract', '');
      await fs.writeFile(path.join(p!.source, 'hello'), 'hi\n');
      await sn.commit('plain', 'plain-extract');
      const [pv] = await sn.view('plain-view', 'plain');
      expect(pv).toEqual({ type: 'bind', source: p!.source, options: ['ro', 'rbind'] });
      // A plain image that merely has a /.gear/index.json (not as an index layer writes it) stays plain.
      const [q] = await sn.prepare('dotgear-extract', '');
      await fs.mkdir(path.join(q!.source, '.gear'));
      await fs.writeFile(path.join(q!.source, '.gear/index.json'), '{"some":"tool config"}');
      await sn.commit('dotgear', 'dotgear-extract');
      expect(store.lowerOf(path.basename(path.dirname(q!.source))).gear).toBe(false);

      const extracted = (dir: string) => extractInto([{ type: 'bind', source: dir, options: [] }], indexTarFile);
      const cases: Array<[string, (dir: string) => Promise<void>, RegExp]> = [
        // The manifest lists a file the tree does not have.
        ['lists-missing', async (dir) => (await extracted(dir), fs.rm(path.join(dir, 'etc/os-release'))), /etc\/os-release/],
        // A regular file with content: not an index form.
        ['has-content', async (dir) => (await extracted(dir), fs.writeFile(path.join(dir, 'usr/doc'), 'data')), /usr\/doc.*has content/],
        // Version 2 holds only the manifest: anything beside it is not from an index layer.
        [
          'v2-extra',
          async (dir) => {
            await extractInto([{ type: 'bind', source: dir, options: [] }], indexTarFileV2);
            await fs.writeFile(path.join(dir, 'planted'), '');
          },
          /holds only \.gear\/index\.json, but the layer also has "planted"/,
        ],
        // Garbage instead of a manifest.
        [
          'garbage',
          async (dir) => {
            await fs.mkdir(path.join(dir, '.gear'));
            await fs.writeFile(path.join(dir, '.gear/index.json'), '{not json', { mode: 0o444 });
            await fs.utimes(path.join(dir, '.gear/index.json'), 0, 0);
          },
          /not valid UTF-8 JSON/,
        ],
      ];
      for (const [key, fill, why] of cases) {
        const [m] = await sn.prepare(key, '');
        await fill(m!.source);
        const err = await sn.commit(`${key}-committed`, key).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(isClass(err, 'InvalidArgument'), String(err)).toBe(true);
        expect(String((err as Error).message)).toMatch(why);
        expect(String((err as Error).message)).toMatch(/gear convert/);
        // Still the active snapshot, with nothing half-built beside its index form.
        expect((await sn.stat(key)).kind).toBe('active');
        const layerDir = path.dirname(m!.source);
        expect((await fs.readdir(layerDir)).filter((n) => n === 'index' || n.startsWith('.index-'))).toEqual([]);
        expect(store.lowerOf(path.basename(layerDir)).gear).toBe(false);
        await sn.remove(key);
      }
      expect(await refFiles()).toEqual([]);
      expect(store.lazyRuntime?.catalog.files).toBe(0);
    } finally {
      await store.close?.();
    }
  });

  it('refuses, with the remedy, a chain on a Gear index too long for containerd to mount', async () => {
    // containerd cannot shorten a lowerdir containing "::", so the limit is the page itself.
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 5_000 } });
    try {
      const sn = await Snapshotter.open({ layers: store, metaRoot: path.join(root, 'snapshotter') });
      await extractInto(await sn.prepare('extract', ''), indexTarFile);
      await sn.commit('l0', 'extract');
      let n = 0;
      let ok: MountSpec | undefined;
      for (; n < 128; n++) {
        const r = await sn.prepare(`top-${n}`, `l${n}`).then(
          (ms) => ms[0],
          (e: unknown) => e as Error,
        );
        if (r instanceof Error) {
          expect(isClass(r, 'FailedPrecondition'), String(r)).toBe(true);
          expect(r.message).toMatch(/fewer layers|shorter gear root/);
          break;
        }
        ok = r;
        await sn.remove(`top-${n}`);
        await sn.commit(`l${n + 1}`, (await sn.prepare(`a${n}`, `l${n}`), `a${n}`));
      }
      expect(n).toBeGreaterThan(40);
      expect(n).toBeLessThan(128);
      // The longest chain accepted really mounts.
      const [last] = await sn.prepare('last', `l${n - 1}`);
      // Near containerd's limit (a page minus 512 bytes), and within it.
      expect(ok).toBeDefined();
      const bytes = last!.options.reduce((t, o) => t + Buffer.byteLength(o) + 1, 0);
      expect(bytes).toBeGreaterThan(4096 - 512 - 100);
      expect(bytes).toBeLessThan(4096 - 512);
      const target = path.join(root, 'mnt-last');
      await mountSpec(last!, target);
      expect(await cat(path.join(target, 'etc/os-release'))).toBe(files['etc/os-release']!.toString());
      expect((await run('umount', [target])).code).toBe(0);
    } finally {
      await store.close?.();
    }
  });

  it('recovers an index dir left by an interrupted adoption', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 5_000 } });
    try {
      const sn = await Snapshotter.open({ layers: store, metaRoot: path.join(root, 'snapshotter') });
      const [m] = await sn.prepare('extract', '');
      await extractInto([m!], indexTarFile);
      // Debris of a crash in the middle of a previous Commit.
      const layerDir = path.dirname(m!.source);
      await fs.mkdir(path.join(layerDir, '.index-deadbeef/etc'), { recursive: true });
      await fs.mkdir(path.join(layerDir, 'index/stale'), { recursive: true });
      await sn.commit('base', 'extract');
      expect((await fs.readdir(layerDir)).filter((n) => n.startsWith('.index-'))).toEqual([]);
      expect(existsSync(path.join(layerDir, 'index/stale'))).toBe(false);
      expect((await fs.lstat(path.join(layerDir, 'index/etc/os-release'))).size).toBe(files['etc/os-release']!.length);
    } finally {
      await store.close?.();
    }
    // Reopened: the record says Gear index layer, the catalog is rebuilt from it.
    const again = await openLayerStore({ root, lazy: { fetchTimeoutMs: 5_000 } });
    try {
      const sn = await Snapshotter.open({ layers: again, metaRoot: path.join(root, 'snapshotter') });
      expect(again.lazyRuntime?.catalog.files).toBe(3);
      const [v] = await sn.view('v', 'base');
      expect(v!.type).toBe('overlay');
    } finally {
      await again.close?.();
    }
  });
});
