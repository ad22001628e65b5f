/**
 * Format v3 on the fetcher (docs/format.md §10.2): members of a pack fetched
 * with coalesced Range requests, each verified and committed alone; chunked
 * files served chunk by chunk, each verified. Real registry (docker-registry
 * 2.8) behind a counting / corrupting proxy, real pool.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Fetcher, type FetchRequest } from '../../src/core/fetcher/fetcher.js';
import { MAX_DELIVERIES } from '../../src/core/fetcher/pack-fetch.js';
import { BlobCatalog } from '../../src/core/lazy/catalog.js';
import { Prefetcher } from '../../src/core/lazy/prefetch.js';
import { ResumeQueue } from '../../src/core/lazy/resume.js';
import { openPool, type Pool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { blobTuplesOf, buildPacks, layoutOf, sha256, type PackedFile } from '../helpers/pack-writer.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const REPO = 'gear-test/v3';
const KiB = 1024;
const MiB = 1024 * KiB;

let reg: TestRegistry;
let proxy: FaultProxy;

/** 40 small files (text-like: zstd), one random (raw), then a chunked 5.5 MiB file; and a copy whose member 20 and chunk 2 are corrupt. */
const text = (i: number) => Buffer.from(`file ${i}\n${'lorem ipsum dolor sit amet '.repeat(50 + i * 13)}`);
const smalls = Array.from({ length: 40 }, (_, i) => (i === 7 ? randomBytes(3000) : text(i)));
const big = Buffer.concat([randomBytes(2 * MiB), Buffer.alloc(2 * MiB, 'x'), randomBytes(1.5 * MiB)]);
const good = buildPacks([...smalls, big], { chunkAbove: 4 * MiB, chunkSize: MiB });
// A second image of other contents whose pack gets corrupted bytes.
const smalls2 = Array.from({ length: 30 }, (_, i) => Buffer.from(`other ${i} ${'sed ut perspiciatis '.repeat(40 + i)}`));
const big2 = Buffer.concat([Buffer.alloc(3 * MiB, 'y'), randomBytes(2 * MiB)]);
const bad = buildPacks([...smalls2, big2], { chunkAbove: 4 * MiB, chunkSize: MiB });
const BAD_MEMBER = 20;
{
  const pk = bad.packs[0]!;
  const mm = bad.files[BAD_MEMBER]!.member!;
  pk[mm.offset + Math.floor(mm.length / 2)] ^= 0x55;
  const ch = bad.files[30]!.chunks![4]!; // random bytes, stored raw
  pk[ch.offset + Math.floor(ch.length / 2)] ^= 0x55;
  bad.packRefs[0] = { digest: sha256(pk), size: pk.length };
}

const packGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:')).length;

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const pusher = new RegistryClient();
  try {
    for (const p of [...good.packs, ...bad.packs]) await pusher.pushBlob(`${reg.host}/${REPO}`, sha256(p), p);
  } finally {
    await pusher.close();
  }
}, 120_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
});

describe('format v3 fetch', () => {
  let root: string;
  let pool: Pool;
  let client: RegistryClient;
  let fetcher: Fetcher;
  const loc = () => ({ registry: proxy.host, repository: REPO });
  const reqOf = (set: typeof good, k: number): FetchRequest => {
    const f: PackedFile = set.files[k]!;
    return { digest: f.digest, size: f.size, location: loc(), ...layoutOf(f, set.packRefs) };
  };

  beforeEach(async () => {
    proxy.setDecider(() => undefined);
    root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-v3-'));
    pool = await openPool({ root, snapshotDelayMs: 10 });
    client = new RegistryClient({ retry: { maxAttempts: 2, minDelayMs: 50, maxDelayMs: 100, maxTotalMs: 2000 } });
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
  });

  afterEach(async () => {
    await fetcher.close();
    await client.close();
    await pool.close();
    await fs.rm(root, { recursive: true, force: true });
  });

  it('fetches 40 members queued together with one Range request; first, middle and last read back right', async () => {
    const before = packGets();
    const reqs = smalls.map((_, k) => reqOf(good, k));
    await Promise.all(fetcher.fetchMany(reqs, { priority: 'background' }));
    expect(packGets() - before).toBe(1);
    expect(fetcher.stats().packRequests).toBe(1);
    for (const k of [0, 7, 20, 39]) {
      expect(pool.has(reqs[k]!.digest)).toBe(true);
      expect(await fs.readFile(pool.path(reqs[k]!.digest))).toEqual(smalls[k]);
    }
    expect(reqs[7]!.member!.encoding).toBe('raw');
    expect(reqs[0]!.member!.encoding).toBe('zstd');
  });

  it('commits the members of one response several at a time, never more than MAX_DELIVERIES', async () => {
    // Each commit ends in an fsync: one at a time, a 930-file prefetch took 3 s on an unshaped link.
    const real = pool.addBuffer.bind(pool);
    let inFlight = 0;
    let most = 0;
    pool.addBuffer = async (digest, data, opts) => {
      most = Math.max(most, ++inFlight);
      try {
        await new Promise((r) => setTimeout(r, 5)); // a slow disk
        await real(digest, data, opts);
      } finally {
        inFlight--;
      }
    };
    const reqs = smalls.map((_, k) => reqOf(good, k));
    const before = packGets();
    await Promise.all(fetcher.fetchMany(reqs, { priority: 'background' }));
    expect(packGets() - before).toBe(1);
    expect(most).toBeGreaterThan(1);
    expect(most).toBeLessThanOrEqual(MAX_DELIVERIES);
    for (const r of reqs) expect(pool.has(r.digest)).toBe(true);
    expect(inFlight).toBe(0);
  });

  it('a miss brings its pack neighbours along in the same request (read-ahead), only as far as asked', async () => {
    const cat = new BlobCatalog();
    const tuples = blobTuplesOf(good.files);
    cat.add('layer1', loc(), tuples, good.packRefs);
    const seed = cat.requests(good.files[10]!.digest)[0]!;
    expect(seed.member?.offset).toBe(good.files[10]!.member!.offset);
    const along = cat.neighbours(seed, 16 * KiB, (d) => !pool.has(d));
    expect(along.length).toBeGreaterThan(3);
    expect(along[0]!.digest).toBe(good.files[11]!.digest);
    expect(along.reduce((n, r) => n + r.member!.length, 0)).toBeLessThanOrEqual(16 * KiB);
    const before = packGets();
    await fetcher.fetch(seed, { along });
    // The neighbours are background jobs of the same request: wait for them to land.
    for (let i = 0; i < 100 && !along.every((r) => pool.has(r.digest)); i++) await new Promise((r) => setTimeout(r, 20));
    expect(packGets() - before).toBe(1);
    for (const r of along) expect(pool.has(r.digest)).toBe(true);
    expect(pool.has(good.files[10 + along.length + 1]!.digest)).toBe(false);
    expect(pool.has(good.files[9]!.digest)).toBe(false);
  });

  it('a prefetch list of a v3 index is fetched with coalesced requests, not one per file', async () => {
    const cat = new BlobCatalog();
    const tuples = blobTuplesOf(good.files.filter((f) => f.member));
    cat.add('layer1', loc(), tuples, good.packRefs);
    const pre = new Prefetcher({ pool, fetcher, catalog: cat });
    // Every other file, in reverse order: the fetcher still merges them by pack (20 files; one request per file without fetchMany).
    const list = smalls.map((c, k) => ({ digest: sha256(c), size: c.length, k })).filter((f) => f.k % 2 === 0).reverse();
    const before = packGets();
    await pre.start('layer1', list);
    expect(pre.layerProgress('layer1')).toMatchObject({ fetched: list.length, failed: 0 });
    for (const f of list) expect(pool.has(f.digest)).toBe(true);
    expect(pool.has(sha256(smalls[1]!))).toBe(false);
    expect(packGets() - before).toBeLessThanOrEqual(2);
    await pre.close();
  });

  it('a chunked file listed first is fetched alongside the pack members, not after all of them', async () => {
    const cat = new BlobCatalog();
    const tuples = blobTuplesOf(good.files);
    cat.add('layer1', loc(), tuples, good.packRefs);
    const bigReq = reqOf(good, 40);
    const firstChunk = Math.min(...good.files[40]!.chunks!.map((c) => c.offset));
    expect(Math.max(...good.files.slice(0, 40).map((f) => f.member!.offset))).toBeLessThan(firstChunk);
    // The members' ranges (all before the big file's chunks in the pack) answer 1.5 s late.
    proxy.setDecider((req) => {
      const m = /bytes=(\d+)-/.exec(String(req.headers.range ?? ''));
      return m && Number(m[1]) < firstChunk ? { kind: 'delay', ms: 1500 } : undefined;
    });
    const pre = new Prefetcher({ pool, fetcher, catalog: cat });
    const done = pre.start('layer1', [big, ...smalls].map((c) => ({ digest: sha256(c), size: c.length })));
    for (let i = 0; i < 100 && !pool.has(bigReq.digest); i++) await new Promise((r) => setTimeout(r, 10));
    expect(pool.has(bigReq.digest)).toBe(true);
    expect(smalls.filter((c) => !pool.has(sha256(c))).length).toBeGreaterThan(0); // still on their way
    await done;
    for (const c of smalls) expect(pool.has(sha256(c))).toBe(true);
    expect(pre.layerProgress('layer1')).toMatchObject({ fetched: 41, failed: 0 });
    await pre.close();
  });

  it('begin plans the prefetch after its caller has gone on (no request before the next turn); done waits for it; stop before it cancels it', async () => {
    const cat = new BlobCatalog();
    const tuples = blobTuplesOf(good.files.filter((f) => f.member));
    cat.add('layer1', loc(), tuples, good.packRefs);
    const pre = new Prefetcher({ pool, fetcher, catalog: cat });
    const list = smalls.map((c) => ({ digest: sha256(c), size: c.length }));
    for (const f of list) expect(pool.has(f.digest)).toBe(false);
    // A begin stopped before its turn fetches nothing.
    const before = packGets();
    pre.begin('layer1', list.slice(0, 1));
    pre.stop('layer1');
    await pre.done('layer1');
    await new Promise((r) => setImmediate(r));
    expect(packGets()).toBe(before);
    expect(pool.has(list[0]!.digest)).toBe(false);
    expect(pre.layerProgress('layer1')).toBeUndefined();
    // Synchronously after begin (an ApplyDiff about to answer): no fetch queued yet, but a run to wait for.
    pre.begin('layer1', list);
    expect(list.filter((f) => fetcher.inFlight(f.digest))).toEqual([]);
    expect(fetcher.stats().queued + fetcher.stats().running).toBe(0);
    expect(pre.status()).toMatch(/1 prefetching/);
    await new Promise((r) => setImmediate(r));
    expect(list.some((f) => fetcher.inFlight(f.digest) || pool.has(f.digest))).toBe(true);
    await pre.done('layer1');
    for (const f of list) expect(pool.has(f.digest)).toBe(true);
    expect(packGets() - before).toBeGreaterThan(0);
    expect(pre.layerProgress('layer1')).toMatchObject({ fetched: list.length, failed: 0 });
    await pre.close();
  });

  it('the crash resume of v3 files queues them together too (coalesced requests)', async () => {
    const cat = new BlobCatalog();
    const tuples = blobTuplesOf(good.files.filter((f) => f.member));
    cat.add('layer1', loc(), tuples, good.packRefs);
    const resume = new ResumeQueue({ pool, fetcher, catalog: cat });
    const before = packGets();
    await resume.start(smalls.map((c) => ({ digest: sha256(c), size: c.length })), 1);
    for (const c of smalls) expect(pool.has(sha256(c))).toBe(true);
    expect(packGets() - before).toBeLessThanOrEqual(2);
    await resume.close();
  });

  it('a corrupt member is rejected alone: EIO-class error, nothing in the pool; the other members of the response land', async () => {
    const reqs = smalls2.map((_, k) => reqOf(bad, k));
    const results = await Promise.allSettled(fetcher.fetchMany(reqs, { priority: 'foreground' }));
    results.forEach((r, k) => {
      if (k === BAD_MEMBER) {
        expect(r.status).toBe('rejected');
        expect(String((r as PromiseRejectedResult).reason.message)).toMatch(/content rejected/);
        expect(pool.has(reqs[k]!.digest)).toBe(false);
      } else {
        expect(r.status).toBe('fulfilled');
        expect(pool.has(reqs[k]!.digest)).toBe(true);
      }
    });
    expect(fetcher.stats().verifyFailures).toBe(1);
    const st = await fs.readdir(path.join(pool.dir, '.staging'));
    expect(st).toEqual([]);
  });

  it('a registry that ignores Range still serves members, reading only up to the last wanted byte', async () => {
    proxy.setDecider((req) => {
      delete req.headers.range;
      return undefined;
    });
    const k = 5;
    const req = reqOf(good, k);
    await fetcher.fetch(req);
    expect(await fs.readFile(pool.path(req.digest))).toEqual(smalls[k]);
    // Only what it needed (plus what was in flight on the socket), far from the whole 40-file + 5 MiB pack.
    expect(fetcher.stats().blobBytes).toBeLessThan(req.member!.offset + req.member!.length + 2 * MiB);
  });

  it('a chunked file: reads across chunk boundaries and far ahead are right, each chunk verified; the pool gets the whole file', async () => {
    const req = reqOf(good, 40);
    expect(req.chunks?.chunks).toHaveLength(6);
    const f = fetcher.openChunked(req);
    const buf = Buffer.alloc(64 * KiB);
    for (const pos of [MiB - 100, 3 * MiB - 10, 5 * MiB + 100, 0]) {
      const n = await f.read(buf, pos);
      expect(n).toBe(Math.min(buf.length, big.length - pos));
      expect(buf.subarray(0, n)).toEqual(big.subarray(pos, pos + n));
    }
    for (let i = 0; i < 200 && !pool.has(req.digest); i++) await new Promise((r) => setTimeout(r, 25));
    expect(pool.has(req.digest)).toBe(true);
    expect((await fs.readFile(pool.path(req.digest))).equals(big)).toBe(true);
    await f.close();
  });

  it('a corrupt chunk fails the reads that need it; other chunks read fine; nothing enters the pool', async () => {
    const req = reqOf(bad, 30);
    const f = fetcher.openChunked(req);
    const buf = Buffer.alloc(4 * KiB);
    expect(await f.read(buf, 10)).toBe(buf.length);
    expect(buf).toEqual(big2.subarray(10, 10 + buf.length));
    await expect(f.read(buf, 4 * MiB + 5)).rejects.toThrow(/chunk rejected/);
    // Across the boundary into the bad chunk: fails too, never a partial answer of unverified bytes.
    await expect(f.read(buf, 4 * MiB - 100)).rejects.toThrow(/chunk rejected/);
    expect(await f.read(buf, 2 * MiB + 1)).toBe(buf.length);
    expect(buf).toEqual(big2.subarray(2 * MiB + 1, 2 * MiB + 1 + buf.length));
    for (let i = 0; i < 200 && fetcher.inFlight(req.digest); i++) await new Promise((r) => setTimeout(r, 25));
    expect(pool.has(req.digest)).toBe(false);
    expect(fetcher.stats().verifyFailures).toBeGreaterThanOrEqual(1);
    await f.close();
  });
});
