// Many writers, pins, reference changes and prunes at once on one pool, with a
// small cap: afterwards the pool's accounting must equal the disk and every
// file must verify. Catches double-counted evictions and commit/evict races.
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { openPool } from '../../src/core/pool/pool.js';

let root: string;
beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-pool-stress-'));
});
afterEach(async () => {
  await fs.rm(root, { recursive: true, force: true });
});

it('keeps accounting equal to the disk under concurrent writes, evictions, pins and prunes', async () => {
  const pool = await openPool({ root, capBytes: 200_000, atimeSampleMs: 0, snapshotDelayMs: 1 });
  let seed = 42;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  // 40 distinct contents, written repeatedly so that the same digest is often written, evicted and rewritten.
  const blobs = Array.from({ length: 40 }, (_, i) => {
    const body = Buffer.alloc(1000 + i * 500, `s${i}`);
    return { body, digest: 'sha256:' + createHash('sha256').update(body).digest('hex') };
  });
  const worker = async (w: number) => {
    for (let i = 0; i < 60; i++) {
      const b = blobs[rand(blobs.length)]!;
      const op = rand(10);
      if (op < 6) {
        const release = rand(2) ? pool.pin(b.digest) : () => undefined;
        const wr = await pool.beginWrite(b.digest, rand(2) ? b.body.length : undefined);
        for (let off = 0; off < b.body.length; off += 700) await wr.write(b.body.subarray(off, off + 700));
        await wr.commit();
        release();
      } else if (op < 8) {
        await pool.setReferenced(`layer${w}`, [b.digest, blobs[rand(blobs.length)]!.digest]);
      } else if (op < 9) {
        await pool.prune(rand(2) ? {} : { toBytes: 100_000 });
      } else {
        const fh = await pool.open(b.digest);
        await fh?.close();
      }
    }
  };
  await Promise.all(Array.from({ length: 8 }, (_, w) => worker(w)));

  const disk = new Map<string, number>();
  const sha = path.join(root, 'pool', 'sha256');
  for (const shard of await fs.readdir(sha)) {
    for (const name of await fs.readdir(path.join(sha, shard))) {
      const body = await fs.readFile(path.join(sha, shard, name));
      expect(createHash('sha256').update(body).digest('hex')).toBe(name);
      disk.set(`sha256:${name}`, body.length);
    }
  }
  let s = pool.stat();
  expect(s.files).toBe(disk.size);
  expect(s.bytes).toBe([...disk.values()].reduce((a, b) => a + b, 0));
  for (const [d, size] of disk) expect(pool.sizeOf(d)).toBe(size);
  // A commit may have found only pinned files to evict; with every pin released the cap holds again.
  await pool.enforceCap();
  expect(pool.stat().bytes).toBeLessThanOrEqual(200_000 * 0.95);
  expect(s).toMatchObject({ pinned: 0, writing: 0 });
  expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
  s = pool.stat();
  await pool.close();

  // And a restart agrees.
  const again = await openPool({ root, atimeSampleMs: 0 });
  expect(again.stat()).toMatchObject({ files: s.files, bytes: s.bytes, owners: 8 });
  await again.close();
});
