/**
 * An index's `size` agrees with the content, whatever the content comes
 * from (issue item 8):
 *  - a content already in the pool with another size: the layer is refused at
 *    apply, naming the path, the digest and both sizes (overlay would show
 *    the index's size and read the pool file's bytes);
 *  - another index layer on the node listing the digest with another size:
 *    refused the same way;
 *  - one manifest giving one digest two sizes: refused by the parser;
 *  - from the registry: a blob whose bytes hash right but whose length is not
 *    the index size never enters the pool (the pool writer's commit).
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import { parseIndexManifest, type IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { openPool } from '../../src/core/pool/pool.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { run } from '../helpers/proc.js';
import { indexTarHeader as hdr } from './fixtures/tarbuild.js';

const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const content = Buffer.alloc(6000, 'x');
const digest = sha(content);

async function tarOf(manifest: IndexManifest, entries: TarHeader[]): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, entries)) chunks.push(c);
  return Buffer.concat(chunks);
}

let root: string;
beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-sizes-'));
});
afterEach(async () => {
  for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
  await fs.rm(root, { recursive: true, force: true });
});

describe.each(['image', 'dir'] as const)('index sizes against the node (%s form)', (form) => {
  it('refuses a layer whose file is in the pool with another size, naming path, digest and both sizes', async () => {
    const pool = await openPool({ root });
    await pool.addFromStream(Readable.from([content]), digest, content.length);
    await pool.close();

    const store = await openLayerStore({ root, indexForm: form, lazy: { fetchTimeoutMs: 5_000, cacheSize: '64MiB' } });
    try {
      await store.create('bad', '', 'ro');
      const lying = await tarOf({ version: 2, files: [{ path: 'etc/motd', digest, size: 10 }] }, [hdr('etc', 'dir'), hdr('etc/motd', 'file')]);
      const err = await store.applyDiff('bad', '', Readable.from([lying])).then(
        () => undefined,
        (e: unknown) => e as Error,
      );
      expect(err, 'the layer must be refused').toBeInstanceOf(Error);
      expect(err!.message).toContain('"etc/motd"');
      expect(err!.message).toContain(digest);
      expect(err!.message).toMatch(/says .* is 10 bytes, but the pool holds that content with 6000 bytes/);
      expect(existsSync(path.join(root, 'layers/bad/index'))).toBe(false);
      expect(existsSync(path.join(root, 'layers/bad/index.erofs'))).toBe(false);

      // The same file with its true size applies.
      await store.create('good', '', 'ro');
      const honest = await tarOf({ version: 2, files: [{ path: 'etc/motd', digest, size: content.length }] }, [hdr('etc', 'dir'), hdr('etc/motd', 'file')]);
      await store.applyDiff('good', '', Readable.from([honest]));
      expect((await fs.stat(path.join(root, 'layers/good/index/etc/motd'))).size).toBe(content.length);

      // Another layer listing the digest with another size is refused too (the content is known at 6000).
      await store.create('bad2', '', 'ro');
      const lying2 = await tarOf({ version: 1, files: [{ path: 'x', digest, size: 7 }] }, [hdr('x', 'file')]);
      await expect(store.applyDiff('bad2', '', Readable.from([lying2]))).rejects.toThrow(/"x": the index says sha256:[0-9a-f]{64} is 7 bytes, but the pool holds that content with 6000 bytes/);
    } finally {
      await store.close?.();
    }
  });

  it('refuses a layer that lists a digest with another size than an index layer already on the node', async () => {
    const store = await openLayerStore({ root, indexForm: form, lazy: { fetchTimeoutMs: 5_000, cacheSize: '64MiB' } });
    try {
      await store.create('first', '', 'ro');
      await store.applyDiff('first', '', Readable.from([await tarOf({ version: 2, files: [{ path: 'a', digest, size: content.length }] }, [hdr('a', 'file')])]));
      await store.create('second', '', 'ro');
      const err = store.applyDiff('second', '', Readable.from([await tarOf({ version: 2, files: [{ path: 'b/c', digest, size: 10 }] }, [hdr('b', 'dir'), hdr('b/c', 'file')])]));
      await expect(err).rejects.toThrow(/"b\/c": the index says sha256:[0-9a-f]{64} is 10 bytes, but another index layer on this node lists it with 6000 bytes/);
    } finally {
      await store.close?.();
    }
  });
});

describe('index sizes within one manifest and from the registry', () => {
  it('refuses one digest with two sizes in one manifest, naming both paths', () => {
    const doc = {
      version: 2,
      tree: [
        { path: 'a', type: 'file', digest, size: 6000 },
        { path: 'b', type: 'file', digest, size: 10 },
      ],
    };
    expect(() => parseIndexManifest(Buffer.from(JSON.stringify(doc)))).toThrow(/file "b": sha256:[0-9a-f]{64} is 10 bytes here but 6000 bytes at "a" \(one content has one size\)/);
  });

  it('never lets a content whose length is not the index size into the pool, although its digest matches', async () => {
    // The fetcher writes every download through beginWrite(digest, index size); this is that writer.
    const pool = await openPool({ root });
    try {
      await expect(pool.addFromStream(Readable.from([content]), digest, 10)).rejects.toThrow();
      expect(pool.has(digest)).toBe(false);
      await expect(pool.addFromStream(Readable.from([content]), digest, 7000)).rejects.toThrow(/6000 bytes instead of 7000/);
      expect(pool.has(digest)).toBe(false);
    } finally {
      await pool.close();
    }
  });
});
