import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { cachePrune, cacheStatus } from '../../src/cli/cache.js';
import { GearError, isClass } from '../../src/core/errors.js';
import { openPool, Pool, PoolNoSpaceError, type PoolOptions } from '../../src/core/pool/pool.js';
import { formatSize, parseSize } from '../../src/core/pool/size.js';
import { zstdCompress } from '../../src/core/sys/zstd.js';

const repo = path.resolve(import.meta.dirname, '../..');

function blob(text: string, size = text.length): { body: Buffer; digest: string } {
  const body = Buffer.alloc(size, text);
  return { body, digest: 'sha256:' + createHash('sha256').update(body).digest('hex') };
}

async function put(pool: Pool, b: { body: Buffer; digest: string }): Promise<void> {
  await pool.addFromStream(Readable.from([b.body]), b.digest, b.body.length);
}

/** Every regular file under pool/sha256 with its size. */
async function filesOnDisk(root: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  const sha = path.join(root, 'pool', 'sha256');
  if (!existsSync(sha)) return out;
  for (const shard of await fs.readdir(sha)) {
    for (const name of await fs.readdir(path.join(sha, shard))) {
      const st = await fs.stat(path.join(sha, shard, name));
      out.set(`sha256:${name}`, st.size);
    }
  }
  return out;
}

let root: string;
const pools: Pool[] = [];

async function open(opts: Partial<PoolOptions> = {}): Promise<Pool> {
  const p = await openPool({ root, capBytes: '1GiB', atimeSampleMs: 0, snapshotDelayMs: 10, ...opts });
  pools.push(p);
  return p;
}

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-pool-'));
});

afterEach(async () => {
  for (const p of pools.splice(0)) await p.close();
  await fs.rm(root, { recursive: true, force: true });
});

describe('parseSize', () => {
  it('reads binary, decimal and plain sizes', () => {
    expect(parseSize('20GiB')).toBe(20 * 1024 ** 3);
    expect(parseSize('500MB')).toBe(500_000_000);
    expect(parseSize('1MiB')).toBe(1024 * 1024);
    expect(parseSize('1048576')).toBe(1048576);
    expect(parseSize('2k')).toBe(2048);
    expect(parseSize('1.5 G')).toBe(1.5 * 1024 ** 3);
    expect(parseSize('10b')).toBe(10);
    expect(parseSize(0)).toBe(0);
    expect(formatSize(1536)).toBe('1.5 KiB');
  });

  it('rejects junk with a message naming the input and the units', () => {
    for (const bad of ['', 'abc', '-1', '10XB', '1e3', 'GiB', '5 GiBs']) {
      let err: unknown;
      try {
        parseSize(bad);
      } catch (e) {
        err = e;
      }
      expect(isClass(err, 'InvalidArgument'), bad).toBe(true);
      expect((err as Error).message).toContain(JSON.stringify(bad));
      expect((err as Error).message).toContain('GiB');
    }
  });
});

describe('pool writes', () => {
  it('commits verified content read-only under sha256/ab/<hex>', async () => {
    const pool = await open();
    const b = blob('hello pool', 5000);
    const w = await pool.beginWrite(b.digest, b.body.length);
    await w.write(b.body.subarray(0, 1234));
    expect(pool.has(b.digest)).toBe(false);
    await w.write(b.body.subarray(1234));
    await w.commit();
    const hex = b.digest.slice(7);
    const file = path.join(root, 'pool', 'sha256', hex.slice(0, 2), hex);
    expect(pool.path(b.digest)).toBe(file);
    expect(Pool.redirectOf(b.digest)).toBe(`/sha256/${hex.slice(0, 2)}/${hex}`);
    expect(pool.has(b.digest)).toBe(true);
    expect((await fs.readFile(file)).equals(b.body)).toBe(true);
    const st = await fs.stat(file);
    expect(st.mode & 0o7777).toBe(0o444);
    expect(st.uid).toBe(process.getuid!());
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(pool.stat()).toMatchObject({ files: 1, bytes: 5000, counters: { bytesFetched: 5000 } });
    await w.abort(); // no-op after commit
    expect(pool.has(b.digest)).toBe(true);
  });

  it('rejects corrupt content, naming both digests, and leaves nothing visible', async () => {
    const pool = await open();
    const good = blob('good', 100);
    const bad = blob('evil', 100);
    const w = await pool.beginWrite(good.digest);
    await w.write(bad.body);
    const err = await w.commit().catch((e: unknown) => e);
    expect(isClass(err, 'InvalidArgument')).toBe(true);
    expect((err as Error).message).toContain(good.digest);
    expect((err as Error).message).toContain(bad.digest);
    expect(pool.has(good.digest)).toBe(false);
    expect(existsSync(pool.path(good.digest))).toBe(false);
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);

    // A wrong size is rejected too, early when the writer overruns.
    const w2 = await pool.beginWrite(good.digest, 50);
    const err2 = await w2.write(good.body).catch((e: unknown) => e);
    expect(isClass(err2, 'InvalidArgument')).toBe(true);
    const err3 = await pool.addFromStream(Readable.from([good.body]), good.digest, 101).catch((e: unknown) => e);
    expect((err3 as Error).message).toMatch(/100 bytes instead of 101/);
    expect(await filesOnDisk(root)).toEqual(new Map());
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(pool.stat()).toMatchObject({ files: 0, bytes: 0, writing: 0 });
  });

  it('validates digests before building any path', async () => {
    const pool = await open();
    for (const d of ['sha256:../../../etc/passwd', 'sha256:ABC', 'md5:' + 'a'.repeat(64), 'sha256:' + 'a'.repeat(63)]) {
      expect(() => pool.path(d)).toThrow(GearError);
      expect(() => pool.has(d)).toThrow(/invalid digest/);
      await expect(pool.beginWrite(d)).rejects.toThrow(/invalid digest/);
      await expect(pool.setReferenced('l', [d])).rejects.toThrow(/invalid digest/);
    }
  });

  it('lets concurrent writers of one digest race: all verified commits succeed, one file, no corruption', async () => {
    const pool = await open();
    const b = blob('race', 300_000);
    const bogus = blob('bogus', 300_000);
    const writers = await Promise.all(Array.from({ length: 6 }, () => pool.beginWrite(b.digest, b.body.length)));
    const liar = await pool.beginWrite(b.digest, b.body.length);
    for (let off = 0; off < b.body.length; off += 65536) {
      const end = Math.min(b.body.length, off + 65536);
      await Promise.all([...writers.map((w) => w.write(b.body.subarray(off, end))), liar.write(bogus.body.subarray(off, end))]);
    }
    const results = await Promise.allSettled([...writers.map((w) => w.commit()), liar.commit()]);
    expect(results.slice(0, 6).every((r) => r.status === 'fulfilled')).toBe(true);
    expect(results[6]!.status).toBe('rejected');
    expect((await fs.readFile(pool.path(b.digest))).equals(b.body)).toBe(true);
    expect(await filesOnDisk(root)).toEqual(new Map([[b.digest, b.body.length]]));
    expect(pool.stat()).toMatchObject({ files: 1, bytes: b.body.length, writing: 0 });
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
  });

  it('adds from a file and from a stream writer', async () => {
    const pool = await open();
    const b = blob('file', 3_000_000);
    const src = path.join(root, 'src.bin');
    await fs.writeFile(src, b.body);
    await pool.addFromFile(src, b.digest);
    expect((await fs.readFile(pool.path(b.digest))).equals(b.body)).toBe(true);
    const c = blob('piped', 70_000);
    const w = await pool.beginWrite(c.digest);
    const { pipeline } = await import('node:stream/promises');
    await pipeline(Readable.from([c.body.subarray(0, 10), c.body.subarray(10)]), w.stream);
    await w.commit();
    expect(pool.has(c.digest)).toBe(true);
  });
  it('adds a buffer in one native task: verified, read-only, durable, counted; a restart keeps it verified', async () => {
    const pool = await open();
    const b = blob('buffer', 200_000);
    const same = blob('buffer', 200_000);
    // Two commits of one digest at once (two pack responses carrying the same file): both succeed, one file.
    await Promise.all([pool.addBuffer(b.digest, b.body), pool.addBuffer(same.digest, Buffer.from(same.body))]);
    const st = await fs.stat(pool.path(b.digest));
    expect(st.mode & 0o7777).toBe(0o444);
    expect((await fs.readFile(pool.path(b.digest))).equals(b.body)).toBe(true);
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(pool.stat()).toMatchObject({ files: 1, bytes: 200_000, writing: 0 });
    // A subarray of a larger buffer (a member of a pack response) is written from its own offset.
    const big = Buffer.concat([Buffer.from('head'), blob('member', 5000).body, Buffer.from('tail')]);
    const member = blob('member', 5000);
    await pool.addBuffer(member.digest, big.subarray(4, 5004));
    expect((await fs.readFile(pool.path(member.digest))).equals(member.body)).toBe(true);
    await pool.close();
    // The mtime recorded is the file's: the next start trusts it (verified), nothing to check again.
    const again = await open();
    expect(again.list().map((e) => [e.digest, e.verified]).sort()).toEqual([[b.digest, true], [member.digest, true]].sort());
  });

  it('adds a zstd frame of the content, decoded and verified off the main thread; a bad frame or size is refused', async () => {
    const pool = await open();
    const b = blob('compressible ', 300_000);
    const frame = zstdCompress(b.body, 3);
    expect(frame.length).toBeLessThan(b.body.length / 10);
    await pool.addBuffer(b.digest, frame, { size: b.body.length, zstd: true });
    expect((await fs.readFile(pool.path(b.digest))).equals(b.body)).toBe(true);
    expect(pool.stat()).toMatchObject({ files: 1, bytes: 300_000, counters: { bytesFetched: 300_000 } });

    const c = blob('other ', 50_000);
    const bad = Buffer.from(zstdCompress(c.body, 3));
    bad[bad.length >> 1]! ^= 0x55;
    const refusals = await Promise.all([
      pool.addBuffer(c.digest, bad, { size: c.body.length, zstd: true }).catch((e: unknown) => e), // corrupt frame
      pool.addBuffer(c.digest, zstdCompress(c.body, 3), { size: c.body.length + 1, zstd: true }).catch((e: unknown) => e), // lying size
      pool.addBuffer(c.digest, c.body, { size: c.body.length - 1 }).catch((e: unknown) => e), // raw, wrong size
      pool.addBuffer(c.digest, zstdCompress(blob('else ', 50_000).body, 3), { size: 50_000, zstd: true }).catch((e: unknown) => e), // another content
    ]);
    for (const err of refusals) {
      expect(isClass(err, 'InvalidArgument')).toBe(true);
      expect((err as Error).message).toMatch(new RegExp(`pool write ${c.digest}: content does not match: `));
    }
    expect((refusals[3] as Error).message).toMatch(/got sha256:[a-f0-9]{64}/);
    expect(pool.has(c.digest)).toBe(false);
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(pool.stat()).toMatchObject({ files: 1, writing: 0, counters: { bytesFetched: 300_000 } });
  });

  it('refuses a buffer that does not match its digest: nothing on disk, nothing staged, nothing counted', async () => {
    const pool = await open();
    const good = blob('good', 100);
    const bad = blob('evil', 100);
    const err = await pool.addBuffer(good.digest, bad.body).catch((e: unknown) => e);
    expect(isClass(err, 'InvalidArgument')).toBe(true);
    expect((err as Error).message).toContain(good.digest);
    expect((err as Error).message).toContain(bad.digest);
    await expect(pool.addBuffer('sha256:../../x', good.body)).rejects.toThrow(/invalid digest/);
    expect(await filesOnDisk(root)).toEqual(new Map());
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(pool.stat()).toMatchObject({ files: 0, bytes: 0, writing: 0, counters: { bytesFetched: 0 } });
  });
});

describe('pool eviction', () => {
  it('evicts unreferenced files first, then referenced ones, each least recently used first; pins hold', async () => {
    let now = 1_000_000_000_000_000; // far in the future: real atimes never count as later uses
    const pool = await open({ capBytes: 1000, clock: () => now }); // evict above 950 down to 850
    const f = Array.from({ length: 12 }, (_, i) => blob(`f${i}`, 100));
    for (let i = 0; i < 9; i++) {
      now += 1;
      await put(pool, f[i]!);
    }
    await pool.setReferenced('L1', [f[1]!.digest, f[3]!.digest]);
    now += 10;
    expect(pool.touch(f[0]!.digest)).toBe(true); // f0 becomes the most recent
    now += 10;
    await put(pool, f[9]!); // 1000 > 950: two go, the oldest unreferenced ones
    const left = () => f.map((b, i) => (pool.has(b.digest) ? i : -1)).filter((i) => i >= 0);
    expect(left()).toEqual([0, 1, 3, 5, 6, 7, 8, 9]);
    expect(pool.stat()).toMatchObject({ bytes: 800, counters: { evictions: 2, evictedBytes: 200 } });

    now += 1;
    const release = pool.pin(f[5]!.digest); // f5: unreferenced but pinned
    await pool.setReferenced('L2', [0, 6, 7, 8, 9].map((i) => f[i]!.digest));
    await pool.setReferenced('L3', [f[10]!.digest, f[11]!.digest]);
    now += 10;
    await put(pool, f[10]!);
    now += 1;
    await put(pool, f[11]!); // 1000 > 950: nothing unpinned is unreferenced, so the oldest referenced go
    expect(left()).toEqual([0, 5, 6, 7, 8, 9, 10, 11]);
    expect(pool.stat()).toMatchObject({ referencedFiles: 7, unreferencedFiles: 1, pinned: 1 });

    expect(await pool.prune()).toEqual({ files: 0, bytes: 0 }); // f5 is unreferenced but pinned
    release();
    release(); // idempotent
    expect(await pool.prune()).toEqual({ files: 1, bytes: 100 });
    expect(left()).toEqual([0, 6, 7, 8, 9, 10, 11]);
    await pool.dropReferences('L3');
    expect(await pool.prune({ toBytes: 550 })).toEqual({ files: 2, bytes: 200 }); // unreferenced f10, f11 first
    expect(left()).toEqual([0, 6, 7, 8, 9]);
    expect(await pool.prune({ all: true })).toEqual({ files: 5, bytes: 500 });
    expect(await filesOnDisk(root)).toEqual(new Map());
    expect(pool.stat()).toMatchObject({ files: 0, bytes: 0, counters: { evictions: 12, evictedBytes: 1200 } });
  });

  it('touchReferenced (a container started on an image) makes every cached file of that owner the most recent', async () => {
    let now = 1_000_000_000_000_000;
    const pool = await open({ capBytes: 1000, clock: () => now }); // evict above 950 down to 850
    const f = Array.from({ length: 10 }, (_, i) => blob(`t${i}`, 100));
    for (let i = 0; i < 9; i++) {
      now += 1;
      await put(pool, f[i]!);
    }
    // Image A (f0-f3, fetched first) and image B (f4-f8); f9 of A is not cached.
    await pool.setReferenced('A', [0, 1, 2, 3, 9].map((i) => f[i]!.digest));
    await pool.setReferenced('B', [4, 5, 6, 7, 8].map((i) => f[i]!.digest));
    now += 10;
    expect(pool.touchReferenced('A')).toBe(4);
    expect(pool.touchReferenced('unknown')).toBe(0);
    expect(pool.list().slice(-4).map((e) => e.digest)).toEqual([0, 1, 2, 3].map((i) => f[i]!.digest).sort());
    now += 1;
    await put(pool, f[9]!); // 1000 > 950: the two least recently used go, B's oldest, not A's
    expect(f.map((b, i) => (pool.has(b.digest) ? i : -1)).filter((i) => i >= 0)).toEqual([0, 1, 2, 3, 6, 7, 8, 9]);
  });

  it('never evicts a file while it is being written', async () => {
    let now = 1_000_000_000_000_000;
    const pool = await open({ capBytes: 1000, clock: () => now });
    const [a, b, c] = [blob('a', 400), blob('b', 400), blob('c', 400)];
    await put(pool, a);
    now += 1;
    await put(pool, b);
    now += 1;
    const again = await pool.beginWrite(a.digest); // a is the LRU file, but someone is writing it
    now += 1;
    await put(pool, c); // 1200 > 950
    expect([a, b, c].map((x) => pool.has(x.digest))).toEqual([true, false, true]);
    await again.write(a.body);
    await again.commit();
    expect((await fs.readFile(pool.path(a.digest))).equals(a.body)).toBe(true);
    expect(pool.stat()).toMatchObject({ files: 2, bytes: 800, writing: 0 });
  });

  it('takes recency from touch, pin and open, and from atimes later than the write', async () => {
    let now = Date.now() + 3_600_000; // later than any real atime of these fresh files
    const pool = await open({ capBytes: 1000, clock: () => now });
    const f = [blob('r0', 300), blob('r1', 300), blob('r2', 300)];
    for (const b of f) {
      now += 1;
      await put(pool, b);
    }
    // r0 was read directly (as overlayfs would) after it was written: its atime is later than mtime.
    const st = await fs.stat(pool.path(f[0]!.digest));
    const readAt = new Date(now + 50);
    await fs.utimes(pool.path(f[0]!.digest), readAt, st.mtime);
    await pool.sampleAtimes();
    now += 100;
    pool.pin(f[1]!.digest)(); // a pin is a use too
    expect(pool.list().map((e) => e.digest)).toEqual([f[2]!.digest, f[0]!.digest, f[1]!.digest]);
    expect(pool.list()[1]!.lastUse).toBe(readAt.getTime());
    now += 1;
    await put(pool, blob('r3', 300)); // 1200 > 950, down to 850: the two least recent (r2, r0) go
    expect(f.map((b) => pool.has(b.digest))).toEqual([false, true, false]);
  });

  it('an opened file stays readable after eviction', async () => {
    const pool = await open();
    const b = blob('open me', 200_000);
    await put(pool, b);
    const fh = await pool.open(b.digest);
    expect(fh).not.toBeNull();
    const other = await fs.open(pool.path(b.digest), 'r');
    expect(await pool.prune({ all: true })).toEqual({ files: 1, bytes: 200_000 });
    expect(existsSync(pool.path(b.digest))).toBe(false);
    expect(pool.has(b.digest)).toBe(false);
    expect((await fh!.readFile()).equals(b.body)).toBe(true);
    expect((await other.readFile()).equals(b.body)).toBe(true);
    await fh!.close();
    await other.close();
    expect(await pool.open(b.digest)).toBeNull();
    expect(pool.stat()).toMatchObject({ counters: { hits: 1, misses: 1 }, hitRate: 0.5 });
  });
});

describe('pool restart', () => {
  it('keeps sizes, recency, references and counters across a restart', async () => {
    let now = 1_000_000_000_000_000;
    const clock = () => now;
    const pool = await open({ capBytes: '1MiB', clock });
    const bs = [blob('x', 10), blob('y', 20), blob('z', 30)];
    for (const b of bs) {
      now += 5;
      await put(pool, b);
    }
    now += 5;
    pool.touch(bs[0]!.digest);
    await pool.setReferenced('layer-a', [bs[1]!.digest]);
    await pool.setReferenced('default/12/sha256:odd owner', [bs[2]!.digest, bs[1]!.digest]);
    (await pool.open(bs[2]!.digest, { count: true }))?.close();
    await pool.open(blob('absent').digest);
    const before = { list: pool.list(), stat: pool.stat() };
    await pool.close();

    const again = await open({ capBytes: undefined, clock });
    expect(again.list()).toEqual(before.list);
    expect(again.stat()).toEqual(before.stat);
    expect(again.stat()).toMatchObject({ capBytes: 1024 * 1024, referencedFiles: 2, owners: 2, counters: { hits: 1, misses: 1 } });
    expect(again.referenceOwners().sort()).toEqual(['default/12/sha256:odd owner', 'layer-a']);
    await again.dropReferences('layer-a');
    await again.close();
    const third = await open({ clock });
    expect(third.stat()).toMatchObject({ referencedFiles: 2, owners: 1 });
  });

  it('trusts the disk over the snapshot: cleans staging, drops missing files, adopts unknown ones unverified', async () => {
    const pool = await open();
    const kept = blob('kept', 100);
    const gone = blob('gone', 100);
    await put(pool, kept);
    await put(pool, gone);
    await pool.close();

    await fs.rm(pool.path(gone.digest));
    await fs.writeFile(path.join(root, 'pool', '.staging', 'deadbeef.123'), 'partial');
    const stranger = blob('stranger', 4096);
    await fs.mkdir(path.dirname(pool.path(stranger.digest)), { recursive: true });
    await fs.writeFile(pool.path(stranger.digest), stranger.body, { mode: 0o644 });
    const liar = blob('liar', 10);
    await fs.mkdir(path.dirname(pool.path(liar.digest)), { recursive: true });
    await fs.writeFile(pool.path(liar.digest), 'not the content');
    // a file whose size changed behind our back is no longer trusted
    await fs.chmod(pool.path(kept.digest), 0o644);
    await fs.appendFile(pool.path(kept.digest), 'x');

    const again = await open();
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(again.has(gone.digest)).toBe(false);
    expect(again.has(stranger.digest)).toBe(true);
    expect(again.stat()).toMatchObject({ files: 3, bytes: 101 + 4096 + 15, unverifiedFiles: 3 });
    expect((await fs.stat(again.path(stranger.digest))).mode & 0o777).toBe(0o444);

    const fh = await again.open(stranger.digest);
    expect(fh).not.toBeNull();
    await fh!.close();
    expect(await again.open(liar.digest)).toBeNull();
    expect(existsSync(again.path(liar.digest))).toBe(false);
    expect(await again.verify(kept.digest)).toBe(false);
    expect(again.stat()).toMatchObject({ files: 1, bytes: 4096, unverifiedFiles: 0 });
  });

  it('survives kill -9 in the middle of writes: nothing partial, every file verifies, accounting equals the disk', async () => {
    const child = path.join(import.meta.dirname, 'fixtures/pool-churn.mjs');
    expect(existsSync(path.join(repo, 'dist/core/pool/pool.js')), 'build first: npx tsc -p tsconfig.json').toBe(true);
    let progressed = 0;
    for (let round = 0; round < 6; round++) {
      const proc = spawn(process.execPath, [child, root, String(round + 3)], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      proc.stdout.on('data', (d) => (out += d));
      proc.stderr.on('data', (d) => (err += d));
      const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
      const deadline = Date.now() + 20_000;
      while (!out.includes('\n') && Date.now() < deadline && proc.exitCode === null) await new Promise((r) => setTimeout(r, 10));
      expect(err, 'churn child failed').toBe('');
      await new Promise((r) => setTimeout(r, 20 + Math.floor(Math.random() * 300)));
      proc.kill('SIGKILL');
      await exited;
      progressed += out.split('\n').filter(Boolean).length;

      const pool = await openPool({ root, capBytes: 256 * 1024, atimeSampleMs: 0 });
      try {
        expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
        const disk = await filesOnDisk(root);
        let bytes = 0;
        for (const [digest, size] of disk) {
          const body = await fs.readFile(pool.path(digest));
          expect('sha256:' + createHash('sha256').update(body).digest('hex')).toBe(digest);
          expect((await fs.stat(pool.path(digest))).mode & 0o777).toBe(0o444);
          expect(pool.sizeOf(digest)).toBe(size);
          bytes += size;
        }
        const s = pool.stat();
        expect(s.files).toBe(disk.size);
        expect(s.bytes).toBe(bytes);
        expect(s.bytes).toBeLessThanOrEqual(256 * 1024 * 0.95 + 40_000 * 2);
      } finally {
        await pool.close();
      }
    }
    expect(progressed).toBeGreaterThan(6);
  });
});

describe('pool locking and the CLI', () => {
  it('refuses a prune while another process holds the pool, and status still works', async () => {
    const daemon = await open();
    const b = blob('status', 1000);
    await put(daemon, b);
    await daemon.flush();
    const err = await cachePrune({ root }).catch((e: unknown) => e);
    expect(isClass(err, 'FailedPrecondition')).toBe(true);
    expect((err as Error).message).toMatch(/in use by another gear process \(pid \d+/);
    expect((err as Error).message).toMatch(/^prune refused: .*Stop the daemon first/);
    const s = await cacheStatus(root);
    expect(s).toMatchObject({ files: 1, bytes: 1000, unreferencedFiles: 1, capBytes: 1024 ** 3 });
    expect(s.lockedBy).toMatch(/^pid /);
    await daemon.close();
    pools.splice(0);
    expect(await cachePrune({ root })).toMatchObject({ files: 1, bytes: 1000, before: 1000, after: 0 });
    expect((await cacheStatus(root)).lockedBy).toBeNull();
  });

  it('takes over the lock of a dead process', async () => {
    const lock = path.join(root, 'pool', '.lock');
    await fs.mkdir(path.dirname(lock), { recursive: true });
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout.toString();
    const ns = await fs.readlink('/proc/self/ns/pid');
    await fs.writeFile(lock, JSON.stringify({ pid: Number(dead), pidNs: ns, startTicks: '1', token: 'x', acquiredAt: 'then' }));
    const pool = await open();
    expect(JSON.parse(await fs.readFile(lock, 'utf8')).pid).toBe(process.pid);
    await pool.close();
    expect(existsSync(lock)).toBe(false);
  });

  it('gear cache status --json and prune run from the built CLI', async () => {
    const gear = path.join(repo, 'dist/cli/gear.js');
    expect(existsSync(gear), 'build first: npx tsc -p tsconfig.json').toBe(true);
    const pool = await open({ capBytes: '10MiB' });
    await put(pool, blob('cli-1', 1000));
    await put(pool, blob('cli-2', 2000));
    await pool.setReferenced('L', [blob('cli-2', 2000).digest]);
    await pool.close();
    pools.splice(0);

    const status = JSON.parse(execFileSync(process.execPath, [gear, 'cache', 'status', '--root', root, '--json']).toString());
    expect(status).toMatchObject({ files: 2, bytes: 3000, capBytes: 10 * 1024 * 1024, referencedFiles: 1, unreferencedBytes: 1000 });
    const human = execFileSync(process.execPath, [gear, 'cache', 'status'], { env: { ...process.env, GEAR_ROOT: root } }).toString();
    expect(human).toMatch(/size: +2\.9 KiB of 10\.0 MiB/);
    const pruned = JSON.parse(execFileSync(process.execPath, [gear, 'cache', 'prune', '--root', root, '--json']).toString());
    expect(pruned).toMatchObject({ files: 1, bytes: 1000, after: 2000 });
    const bad = spawnSync(process.execPath, [gear, 'cache', 'prune', '--root', root, '--to', '12 parsecs']);
    expect(bad.status).not.toBe(0);
    expect(bad.stderr.toString()).toMatch(/invalid size "12 parsecs"/);
    const both = spawnSync(process.execPath, [gear, 'cache', 'prune', '--root', root, '--all', '--to', '1MiB']);
    expect(both.status).not.toBe(0);
    const all = JSON.parse(execFileSync(process.execPath, [gear, 'cache', 'prune', '--root', root, '--all', '--json']).toString());
    expect(all).toMatchObject({ files: 1, after: 0 });
  });
});

describe('pool on a full disk', () => {
  const isRoot = process.getuid?.() === 0;
  let mnt: string | undefined;

  afterEach(async () => {
    for (const p of pools.splice(0)) await p.close();
    if (mnt) {
      spawnSync('umount', [mnt]);
      await fs.rm(mnt, { recursive: true, force: true });
      mnt = undefined;
    }
  });

  /** A pool on a 2 MiB tmpfs (unmounted after the test). */
  async function tmpfsPool(): Promise<{ pool: Pool; dir: string }> {
    const dir = (mnt = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-pool-tmpfs-')));
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'gear-pool-test', dir]);
    const pool = await openPool({ root: dir, capBytes: '1GiB', atimeSampleMs: 0, snapshotDelayMs: 10 });
    pools.push(pool);
    return { pool, dir };
  }

  it.skipIf(!isRoot)('ENOSPC aborts the write with a clear error, evicts, and leaves nothing partial visible', async () => {
    const { pool, dir } = await tmpfsPool();

    // Nothing to evict: the error says so, and no partial file is visible.
    const huge = blob('huge', 3 * 1024 * 1024);
    const err = await pool.addFromStream(Readable.from([huge.body.subarray(0, 1 << 20), huge.body.subarray(1 << 20)]), huge.digest).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PoolNoSpaceError);
    expect((err as Error).message).toMatch(/no space left on device while writing sha256:[a-f0-9]{64} to the pool .*nothing could be evicted/);
    expect(await filesOnDisk(dir)).toEqual(new Map());
    expect(await fs.readdir(path.join(dir, 'pool', '.staging'))).toEqual([]);

    // An unreferenced file takes most of the disk; a write of unknown size hits ENOSPC, which evicts it.
    const old = blob('old', 1200 * 1024);
    await put(pool, old);
    const next = blob('next', 1000 * 1024);
    const err2 = await pool.addFromStream(Readable.from([next.body]), next.digest).catch((e: unknown) => e);
    expect(err2).toBeInstanceOf(PoolNoSpaceError);
    expect((err2 as Error).message).toMatch(/evicted 1 file\(s\), 1\.2 MiB; the write can be retried/);
    expect(pool.has(old.digest)).toBe(false);
    expect(await filesOnDisk(dir)).toEqual(new Map());
    await pool.addFromStream(Readable.from([next.body]), next.digest); // the retry fits
    expect(await filesOnDisk(dir)).toEqual(new Map([[next.digest, next.body.length]]));

    // With a known size, room is made before writing (free space check), so no error at all.
    const third = blob('third', 1200 * 1024);
    await pool.addFromStream(Readable.from([third.body]), third.digest, third.body.length);
    expect(await filesOnDisk(dir)).toEqual(new Map([[third.digest, third.body.length]]));
    expect(pool.stat()).toMatchObject({ files: 1, bytes: third.body.length });
    await pool.close();
  });

  it.skipIf(!isRoot)('a buffer larger than the disk fails with the pool error, and its staging file is gone', async () => {
    const { pool, dir } = await tmpfsPool();
    const huge = blob('huge', 3 * 1024 * 1024);
    const err = await pool.addBuffer(huge.digest, huge.body).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PoolNoSpaceError);
    expect((err as Error).message).toMatch(/no space left on device while writing sha256:[a-f0-9]{64} to the pool .*nothing could be evicted/);
    expect(await filesOnDisk(dir)).toEqual(new Map());
    expect(await fs.readdir(path.join(dir, 'pool', '.staging'))).toEqual([]);
    const small = blob('small', 100_000);
    await pool.addBuffer(small.digest, small.body);
    expect(await filesOnDisk(dir)).toEqual(new Map([[small.digest, small.body.length]]));
    await pool.close();
  });
});
