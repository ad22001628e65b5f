/**
 * Background fetch (src/core/lazy/completion.ts): an index layer's image is
 * completed into the pool with few coalesced requests, only after containers
 * stop missing, never past the pool's low watermark, and a corrupt member
 * fails alone. A real pool, fetcher and registry (through a counting proxy).
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Fetcher } from '../../src/core/fetcher/fetcher.js';
import { BlobCatalog } from '../../src/core/lazy/catalog.js';
import { ImageCompletion, type CompletionDeps } from '../../src/core/lazy/completion.js';
import { openPool, type Pool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { blobTuplesOf, buildPacks, sha256 } from '../helpers/pack-writer.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const REPO = 'gear-test/complete';
const MiB = 1024 * 1024;

let reg: TestRegistry;
let proxy: FaultProxy;

const text = (i: number) => Buffer.from(`file ${i}\n${'lorem ipsum dolor sit amet '.repeat(50 + i * 13)}`);
const smalls = Array.from({ length: 40 }, (_, i) => (i === 7 ? randomBytes(3000) : text(i)));
const big = Buffer.concat([randomBytes(2 * MiB), Buffer.alloc(2 * MiB, 'x'), randomBytes(1.5 * MiB)]);
const good = buildPacks([...smalls, big], { chunkAbove: 4 * MiB, chunkSize: MiB });
const smalls2 = Array.from({ length: 30 }, (_, i) => Buffer.from(`other ${i} ${'sed ut perspiciatis '.repeat(40 + i)}`));
const bad = buildPacks(smalls2, {});
const BAD_MEMBER = 12;
{
  const pk = bad.packs[0]!;
  const mm = bad.files[BAD_MEMBER]!.member!;
  pk[mm.offset + Math.floor(mm.length / 2)] ^= 0x55;
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

describe('background fetch of an image (format v3)', () => {
  let root: string;
  let pool: Pool;
  let client: RegistryClient;
  let fetcher: Fetcher;
  let catalog: BlobCatalog;
  const loc = () => ({ registry: proxy.host, repository: REPO });
  const files = (set: typeof good) => set.files.map((f) => ({ digest: f.digest, size: f.size }));

  async function open(capBytes?: number): Promise<void> {
    root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-complete-'));
    pool = await openPool({ root, snapshotDelayMs: 10, ...(capBytes ? { capBytes } : {}) });
    client = new RegistryClient({ retry: { maxAttempts: 2, minDelayMs: 50, maxDelayMs: 100, maxTotalMs: 2000 } });
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
    catalog = new BlobCatalog();
    catalog.add('layer1', loc(), blobTuplesOf(good.files), good.packRefs);
    catalog.add('layer2', loc(), blobTuplesOf(bad.files), bad.packRefs);
  }

  beforeEach(() => proxy.setDecider(() => undefined));

  afterEach(async () => {
    await fetcher.close();
    await client.close();
    await pool.close();
    await fs.rm(root, { recursive: true, force: true });
  });

  it('completes every file, packed members and a chunked file, with a few coalesced requests, in pack order', async () => {
    await open();
    const c = new ImageCompletion({ pool, fetcher, catalog }, { quietMs: 0 });
    // The plan: members by offset whatever the index order, the chunked file after them.
    const planned = c.plan([...files(good)].reverse());
    expect(planned.map((f) => f.digest)).toEqual([...good.files.slice(0, 40).map((f) => f.digest), good.files[40]!.digest]);
    const before = packGets();
    c.begin('layer1', files(good));
    expect(c.status()).toMatch(/1 running/);
    await c.done('layer1');
    for (const f of good.files) expect(pool.has(f.digest)).toBe(true);
    expect((await fs.readFile(pool.path(good.files[40]!.digest))).equals(big)).toBe(true); // not toEqual: 5.5 MiB byte by byte takes vitest 40 s
    expect(await fs.readFile(pool.path(good.files[20]!.digest))).toEqual(smalls[20]);
    // 40 members in one request, the 5.5 MiB file's chunks in one or two.
    expect(packGets() - before).toBeLessThanOrEqual(3);
    expect(c.progress()).toMatchObject({ layers: 1, files: 41, fetched: 41, failed: 0, running: 0, cacheFull: 0 });
    expect(c.status()).toMatch(/^on: 41 of 41 missing files in the pool \(41 fetched in the background/);
    // A second run finds nothing to do.
    c.begin('layer1', files(good));
    await c.done('layer1');
    expect(c.progress()).toMatchObject({ files: 0, fetched: 0 });
    await c.close();
  });

  it('waits while containers miss, and starts only a quiet spell after the layer was recorded', async () => {
    await open();
    let busy = true;
    const deps: CompletionDeps = {
      pool,
      catalog,
      fetcher: {
        fetch: (r, o) => fetcher.fetch(r, o),
        fetchMany: (r, o) => fetcher.fetchMany(r, o),
        inFlight: (d) => fetcher.inFlight(d),
        demandIdleMs: () => (busy ? 0 : fetcher.demandIdleMs()),
      },
    };
    const c = new ImageCompletion(deps, { quietMs: 300 });
    const before = packGets();
    const started = Date.now();
    c.begin('layer1', files(good));
    await new Promise((r) => setTimeout(r, 600));
    expect(packGets()).toBe(before);
    expect(good.files.filter((f) => pool.has(f.digest))).toEqual([]);
    // A container's miss fetches one of the planned files first.
    await fetcher.fetch(catalog.requests(good.files[5]!.digest)[0]!);
    busy = false;
    await c.done('layer1');
    expect(Date.now() - started).toBeGreaterThanOrEqual(600);
    for (const f of good.files) expect(pool.has(f.digest)).toBe(true);
    expect(c.progress()).toMatchObject({ files: 41, done: 41, fetched: 40 });
    expect(c.status()).toMatch(/^on: 41 of 41 missing files in the pool \(40 fetched in the background/);
    await c.close();
  });

  it('the fetcher reports demand: a foreground fetch resets the quiet spell, a background one does not', async () => {
    await open();
    await new Promise((r) => setTimeout(r, 30));
    expect(fetcher.demandIdleMs()).toBeGreaterThanOrEqual(30);
    const cat = catalog.requests(good.files[3]!.digest)[0]!;
    await fetcher.fetch(catalog.requests(good.files[2]!.digest)[0]!, { priority: 'background' });
    expect(fetcher.demandIdleMs()).toBeGreaterThanOrEqual(30);
    await fetcher.fetch(cat);
    expect(fetcher.demandIdleMs()).toBeLessThan(1000);
    const idleAfter = fetcher.demandIdleMs();
    await new Promise((r) => setTimeout(r, 50));
    expect(fetcher.demandIdleMs()).toBeGreaterThanOrEqual(idleAfter + 40);
    // A reader of a chunked file not in the pool waits for the network too (the registry answers
    // 800 ms late); its file's assembly into the pool (background) does not; a read of it once in
    // the pool does not either.
    const bigReq = catalog.requests(good.files[40]!.digest)[0]!;
    proxy.setDecider(() => ({ kind: 'delay', ms: 800 }));
    const f = fetcher.openChunked(bigReq);
    await new Promise((r) => setTimeout(r, 300));
    expect(fetcher.demandIdleMs()).toBeGreaterThanOrEqual(300);
    const buf = Buffer.alloc(4096);
    const reading = f.read(buf, 3 * MiB);
    await new Promise((r) => setTimeout(r, 100));
    expect(fetcher.demandIdleMs()).toBeLessThan(300);
    expect(await reading).toBe(4096);
    expect(buf.equals(big.subarray(3 * MiB, 3 * MiB + 4096))).toBe(true);
    await f.close();
    proxy.setDecider(() => undefined);
    await fetcher.fetch(bigReq, { priority: 'background' }); // the assembly, into the pool
    expect(pool.has(bigReq.digest)).toBe(true);
    await new Promise((r) => setTimeout(r, 300));
    const g = fetcher.openChunked(bigReq);
    expect(await g.read(buf, 0)).toBe(4096);
    await g.close();
    expect(fetcher.demandIdleMs()).toBeGreaterThanOrEqual(300);
  });

  it('stops at the low watermark of a small cache: nothing is evicted to complete an image', async () => {
    // Cap 4 MiB: low watermark 3.4 MiB. The 40 small files fit, the 5.5 MiB file does not.
    await open(4 * MiB);
    const other = Buffer.from('a file some container fetched earlier');
    await pool.addBuffer(sha256(other), other);
    const c = new ImageCompletion({ pool, fetcher, catalog }, { quietMs: 0 });
    c.begin('layer1', files(good));
    await c.done('layer1');
    for (const f of good.files.slice(0, 40)) expect(pool.has(f.digest)).toBe(true);
    expect(pool.has(good.files[40]!.digest)).toBe(false);
    expect(pool.has(sha256(other))).toBe(true);
    expect(pool.stat().counters.evictions).toBe(0);
    expect(pool.stat().bytes).toBeLessThanOrEqual(pool.stat().lowWatermarkBytes);
    expect(c.progress()).toMatchObject({ fetched: 40, cacheFull: 1 });
    expect(c.status()).toMatch(/stopped at the cache's low watermark/);
    await c.close();
  });

  it('a corrupt member fails alone (not in the pool); the others of its pack complete', async () => {
    await open();
    const c = new ImageCompletion({ pool, fetcher, catalog }, { quietMs: 0 });
    c.begin('layer2', files(bad));
    await c.done('layer2');
    expect(pool.has(bad.files[BAD_MEMBER]!.digest)).toBe(false);
    for (const [k, f] of bad.files.entries()) if (k !== BAD_MEMBER) expect(pool.has(f.digest)).toBe(true);
    expect(c.progress()).toMatchObject({ fetched: 29, failed: 1 });
    await c.close();
  });

  it('stop and close end a run that waits; nothing is fetched after', async () => {
    await open();
    const c = new ImageCompletion({ pool, fetcher, catalog }, { quietMs: 60_000 });
    const before = packGets();
    c.begin('layer1', files(good));
    c.begin('layer2', files(bad));
    c.stop('layer1');
    await c.done('layer1');
    await c.close();
    expect(c.progress().layers).toBe(0);
    await new Promise((r) => setTimeout(r, 50));
    expect(packGets()).toBe(before);
  });
});
