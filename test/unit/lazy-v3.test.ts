/**
 * Format v3 index layers in the layer store, with the real lazy path:
 * registry (behind a counting / corrupting proxy) → coalescing fetcher →
 * pool / miss filesystem (FUSE) → overlay metacopy mounts. Needs root,
 * /dev/fuse, overlayfs with data-only layers (Linux 6.5+).
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexFile, IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { buildPacks, sha256 } from '../helpers/pack-writer.js';
import { run } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { indexTarHeader as hdr } from './fixtures/tarbuild.js';

const REPO = 'gear-test/lazy-v3';
const KiB = 1024;
const MiB = 1024 * KiB;

let reg: TestRegistry;
let proxy: FaultProxy;

/**
 * 120 small docs (a walk), 20 modules of one directory, a random one, a shared file (also in a v2
 * index), a big chunked file, and a corrupt one.
 */
const docs: Record<string, Buffer> = {};
for (let i = 0; i < 120; i++) docs[`usr/share/doc/p${String(i).padStart(3, '0')}/copyright`] = Buffer.from(`package ${i}\n${'Permission is hereby granted, free of charge. '.repeat(20 + (i % 40))}`);
const modules: Record<string, Buffer> = {};
for (let i = 0; i < 20; i++) modules[`usr/lib/app/__pycache__/m${String(i).padStart(2, '0')}.pyc`] = randomBytes(1500 + i);
const files: Record<string, Buffer> = {
  ...docs,
  ...modules,
  'bin/big': Buffer.concat([randomBytes(1536 * KiB), Buffer.alloc(2 * MiB, 'z'), randomBytes(1536 * KiB + 123)]),
  'etc/random': randomBytes(5000),
  'etc/shared': Buffer.from('the same content in a v2 and a v3 image\n'.repeat(10)),
  'etc/zbad': Buffer.from('this member gets a corrupted byte '.repeat(30)),
};
const paths = Object.keys(files).sort();
let v3Tar: Buffer;
let v2Tar: Buffer;
let bigChunks: number;

async function tarOf(manifest: IndexManifest, entries: TarHeader[]): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, entries)) chunks.push(c);
  return Buffer.concat(chunks);
}

function entriesOf(ps: string[]): TarHeader[] {
  const dirs = new Set<string>();
  for (const p of ps) {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
  }
  return [...[...dirs].map((d) => [d, 'dir'] as const), ...ps.map((p) => [p, 'file'] as const)]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([p, type]) => hdr(p, type));
}

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  // Pack order = path order (as gear convert without a profile); big chunked.
  const built = buildPacks(paths.map((p) => files[p]!), { chunkAbove: 4 * MiB, chunkSize: MiB });
  const bad = built.files[paths.indexOf('etc/zbad')]!.member!;
  const pk = built.packs[bad.pack]!;
  pk[bad.offset + Math.floor(bad.length / 2)] ^= 0x5a;
  built.packRefs[bad.pack] = { digest: sha256(pk), size: pk.length };
  bigChunks = built.files[paths.indexOf('bin/big')]!.chunks!.length;
  const pusher = new RegistryClient();
  try {
    for (const p of built.packs) await pusher.pushBlob(`${reg.host}/${REPO}`, sha256(p), p);
    await pusher.pushBlob(`${reg.host}/${REPO}`, sha256(files['etc/shared']!), files['etc/shared']!);
  } finally {
    await pusher.close();
  }
  const location = { registry: proxy.host, repository: REPO };
  const v3files: IndexFile[] = paths.map((p, k) => {
    const f = built.files[k]!;
    return f.member ? { path: p, digest: f.digest, size: f.size, member: f.member } : { path: p, digest: f.digest, size: f.size, chunkSize: f.chunkSize!, chunks: f.chunks! };
  });
  v3Tar = await tarOf({ version: 3, location, packs: built.packRefs, files: v3files }, entriesOf(paths));
  const shared = files['etc/shared']!;
  v2Tar = await tarOf({ version: 2, location, files: [{ path: 'etc/shared', digest: sha256(shared), size: shared.length }] }, entriesOf(['etc/shared']));
}, 120_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
});

let root: string;
const blobGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:')).length;

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-lazy-v3-'));
  proxy.setDecider(() => undefined);
});

afterEach(async () => {
  for (const m of mountsUnder(path.join(root, 'layers'))) await run('umount', ['-l', m.mountPoint]);
  for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
  await fs.rm(root, { recursive: true, force: true });
});

async function withStore<T>(opts: { readAhead?: string; root?: string }, fn: (store: Awaited<ReturnType<typeof openLayerStore>>, merged: string) => Promise<T>): Promise<T> {
  const store = await openLayerStore({ root: opts.root ?? root, lazy: { fetchTimeoutMs: 10_000, cacheSize: '256MiB', ...(opts.readAhead !== undefined ? { readAhead: opts.readAhead } : {}) } });
  try {
    await store.create('idx3', '', 'ro');
    await store.applyDiff('idx3', '', Readable.from([v3Tar]));
    await store.create('ctr', 'idx3', 'rw');
    const merged = await store.get('ctr');
    try {
      return await fn(store, merged);
    } finally {
      await store.put('ctr');
    }
  } finally {
    await store.close?.();
  }
}

describe('format v3 index layers, lazily through FUSE', () => {
  it('first, middle and last members of a pack and reads across chunk boundaries return the right bytes', async () => {
    await withStore({ readAhead: '0' }, async (store, merged) => {
      for (const p of [paths[0]!, paths[Math.floor(paths.length / 2)]!, 'etc/random', 'etc/shared']) {
        expect((await fs.readFile(path.join(merged, p))).equals(files[p]!)).toBe(true);
      }
      const big = files['bin/big']!;
      expect(bigChunks).toBe(6);
      const fh = await fs.open(path.join(merged, 'bin/big'), 'r');
      try {
        for (const pos of [MiB - 7, 2 * MiB - 1, 5 * MiB - 3, 0]) {
          const buf = Buffer.alloc(100);
          const { bytesRead } = await fh.read(buf, 0, 100, pos);
          expect(bytesRead).toBe(100);
          expect(buf.equals(big.subarray(pos, pos + 100))).toBe(true);
        }
      } finally {
        await fh.close();
      }
      expect((await fs.readFile(path.join(merged, 'bin/big'))).equals(big)).toBe(true);
      const pool = store.lazyRuntime!.pool;
      for (let i = 0; i < 200 && !pool.has(sha256(big)); i++) await new Promise((r) => setTimeout(r, 25));
      expect(pool.has(sha256(big))).toBe(true);
    });
  });

  it('a corrupt member gives EIO and nothing in the pool; the other files of its pack still read', async () => {
    await withStore({}, async (store, merged) => {
      await expect(fs.readFile(path.join(merged, 'etc/zbad'))).rejects.toMatchObject({ code: 'EIO' });
      expect(store.lazyRuntime!.pool.has(sha256(files['etc/zbad']!))).toBe(false);
      const hex = sha256(files['etc/zbad']!).slice(7);
      expect((await fs.readdir(path.join(root, 'pool/.staging'))).filter((n) => n.startsWith(hex))).toEqual([]);
      // Again: still EIO (the next open tries again and rejects again), never the corrupt bytes.
      await expect(fs.readFile(path.join(merged, 'etc/zbad'))).rejects.toMatchObject({ code: 'EIO' });
      expect((await fs.readFile(path.join(merged, 'etc/shared'))).equals(files['etc/shared']!)).toBe(true);
      expect((await fs.readFile(path.join(merged, 'etc/random'))).equals(files['etc/random']!)).toBe(true);
    });
  });

  it('a v2 and a v3 index layer with the same file share one pool file', async () => {
    await withStore({}, async (store, merged) => {
      await store.create('idx2', '', 'ro');
      await store.applyDiff('idx2', '', Readable.from([v2Tar]));
      await store.create('ctr2', 'idx2', 'rw');
      const m2 = await store.get('ctr2');
      try {
        const shared = files['etc/shared']!;
        const before = blobGets();
        expect((await fs.readFile(path.join(merged, 'etc/shared'))).equals(shared)).toBe(true);
        expect(blobGets() - before).toBe(1); // one fetch (the v3 pack range)
        expect((await fs.readFile(path.join(m2, 'etc/shared'))).equals(shared)).toBe(true);
        expect(blobGets() - before).toBe(1); // the v2 image reads the same pool file
        const pool = store.lazyRuntime!.pool;
        expect(pool.list().filter((e) => e.digest === sha256(shared))).toHaveLength(1);
      } finally {
        await store.put('ctr2');
      }
    });
  });

  it('a walk over 120 small files costs far fewer requests than files with read-ahead, one per file without', async () => {
    const walk = async (_store: unknown, merged: string) => {
      for (const p of Object.keys(docs).sort()) expect((await fs.readFile(path.join(merged, p))).equals(docs[p]!)).toBe(true);
    };
    let before = blobGets();
    await withStore({ readAhead: '0' }, walk);
    const without = blobGets() - before;
    const root2 = path.join(root, 'second');
    await fs.mkdir(root2);
    before = blobGets();
    await withStore({ readAhead: '1MiB', root: root2 }, walk);
    const withRa = blobGets() - before;
    expect(without).toBe(120);
    expect(withRa).toBeLessThanOrEqual(3);
  });

  it("a miss brings its directory's files along, also those before it in the pack: 20 modules read last to first in one request", async () => {
    const before = blobGets();
    await withStore({}, async (_store, merged) => {
      for (const p of Object.keys(modules).sort().reverse()) expect((await fs.readFile(path.join(merged, p))).equals(modules[p]!)).toBe(true);
    });
    // The forward window alone (the record without directories, or read-ahead before it) made 20.
    expect(blobGets() - before).toBe(1);
  });

  it('a restarted store registers the pack and chunk locations again from its layer record', async () => {
    const lazy = { fetchTimeoutMs: 10_000, cacheSize: '256MiB' };
    const first = await openLayerStore({ root, lazy });
    try {
      await first.create('idx3', '', 'ro');
      await first.applyDiff('idx3', '', Readable.from([v3Tar]));
    } finally {
      await first.close?.();
    }
    const rec = JSON.parse(await fs.readFile(path.join(root, 'layers/idx3/layer.json'), 'utf8')) as { gear: { packs: unknown[]; blobs: unknown[][] } };
    expect(rec.gear.packs.length).toBeGreaterThanOrEqual(1);
    expect(rec.gear.blobs.some((b) => typeof b[2] === 'object' && b[2] !== null && 'cs' in b[2])).toBe(true);
    expect(rec.gear.blobs.some((b) => typeof b[2] === 'object' && b[2] !== null && 'p' in b[2])).toBe(true);
    const second = await openLayerStore({ root, lazy });
    try {
      await second.create('ctr', 'idx3', 'rw');
      const merged = await second.get('ctr');
      try {
        const before = blobGets();
        expect((await fs.readFile(path.join(merged, 'etc/random'))).equals(files['etc/random']!)).toBe(true);
        expect((await fs.readFile(path.join(merged, 'bin/big'))).equals(files['bin/big']!)).toBe(true);
        expect(blobGets() - before).toBeGreaterThanOrEqual(2);
      } finally {
        await second.put('ctr');
      }
    } finally {
      await second.close?.();
    }
  });
});
