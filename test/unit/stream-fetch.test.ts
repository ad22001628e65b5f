/**
 * Big files are streamed (docs/format.md §4 "Big files"): a read near the
 * start (or, by HTTP Range, near the end) is served while the one download
 * still runs; the file enters the pool only once its whole digest verifies.
 * Real registry (docker-registry 2.8), a throttling / corrupting proxy, and —
 * for the end-to-end cases — the real miss filesystem under overlay mounts
 * (needs root, /dev/fuse, Linux 6.5+ overlayfs).
 *
 * "Not waiting for the whole file" is shown by state (the fetcher's progress,
 * the pool), never by timing: the throttled download takes well over 10 s.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { Fetcher, type FetchRequest, type StreamedFile } from '../../src/core/fetcher/fetcher.js';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import { GearMediaType, type IndexManifest } from '../../src/core/index/manifest.js';
import { indexTarHeader } from './fixtures/tarbuild.js';
import type { LazyRuntime } from '../../src/core/lazy/runtime.js';
import { openLayerStore } from '../../src/core/layers/store.js';

type LayerStore = Awaited<ReturnType<typeof openLayerStore>>;
import { openPool, type Pool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { run } from '../helpers/proc.js';
import { startFaultProxy, type FaultAction, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const REPO = 'gear-test/big';
const MiB = 1024 * 1024;
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

let reg: TestRegistry;
let proxy: FaultProxy;
/** 256 MiB of random data: the end-to-end big file. */
const big = randomBytes(256 * MiB);
/** Smaller big files for the fetcher-level cases. */
const medium = randomBytes(24 * MiB);
const corrupt = randomBytes(16 * MiB);
const small = Buffer.from('a small file\n');

const isBlobGet = (req: { method?: string | undefined; url?: string | undefined }) => req.method === 'GET' && !!req.url?.includes('/blobs/sha256:');
/** Full-blob GETs go at `bytesPerSecond`; Range GETs pass at full speed. */
function throttleFull(bytesPerSecond: number, extra: Partial<Extract<FaultAction, { kind: 'throttle' }>> = {}) {
  proxy.setDecider((req) => (isBlobGet(req) && !req.headers.range ? { kind: 'throttle', bytesPerSecond, ...extra } : undefined));
}
const fullGets = (digest: string) => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes(digest)).length;

/** Fills buf from position (a streamed reader may return short reads, as the miss filesystem allows). */
async function readFull(f: StreamedFile, buf: Buffer, position: number): Promise<number> {
  let got = 0;
  while (got < buf.length) {
    const n = await f.read(buf.subarray(got), position + got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

async function until(what: string, cond: () => boolean, ms = 120_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const pusher = new RegistryClient();
  try {
    for (const c of [big, medium, corrupt, small]) await pusher.pushBlob(`${reg.host}/${REPO}`, sha(c), c);
  } finally {
    await pusher.close();
  }
}, 180_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
});

beforeEach(() => {
  proxy.setDecider(() => undefined);
});

describe('streamed fetch (fetcher)', () => {
  let root: string;
  let pool: Pool;
  let client: RegistryClient;
  let fetcher: Fetcher | undefined;
  const reqOf = (c: Buffer): FetchRequest => ({ digest: sha(c), size: c.length, location: { registry: proxy.host, repository: REPO } });

  beforeEach(async () => {
    root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-stream-'));
    pool = await openPool({ root, snapshotDelayMs: 10 });
    client = new RegistryClient({ retry: { maxAttempts: 2, minDelayMs: 50, maxDelayMs: 100, maxTotalMs: 2000 } });
  });

  afterEach(async () => {
    await fetcher?.close();
    fetcher = undefined;
    await client.close();
    await pool.close();
    await fs.rm(root, { recursive: true, force: true });
  });

  it('serves the head from the staging file and the tail by Range while the download runs; the pool gets it once verified', async () => {
    const req = reqOf(medium);
    throttleFull(2 * MiB); // ~12 s for 24 MiB
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
    const f = fetcher.stream(req);
    const head = Buffer.alloc(64 * 1024);
    expect(await readFull(f, head, 0)).toBe(head.length);
    expect(sha(head)).toBe(sha(medium.subarray(0, head.length)));
    let p = fetcher.progress(req.digest);
    expect(p?.state).toBe('running');
    expect(p!.written).toBeLessThan(req.size);
    expect(pool.has(req.digest)).toBe(false);
    expect(existsSync(pool.path(req.digest))).toBe(false);
    expect(pool.stat().writing).toBe(1);

    const tailAt = req.size - 100_000;
    const tail = Buffer.alloc(64 * 1024);
    expect(await readFull(f, tail, tailAt)).toBe(tail.length);
    expect(sha(tail)).toBe(sha(medium.subarray(tailAt, tailAt + tail.length)));
    expect(fetcher.stats().rangeRequests).toBeGreaterThanOrEqual(1);
    p = fetcher.progress(req.digest);
    expect(p!.written).toBeLessThan(tailAt);
    expect(pool.has(req.digest)).toBe(false);

    // A second reader joins the same download.
    const g = fetcher.stream(req);
    expect(fetcher.progress(req.digest)?.readers).toBe(2);
    await g.close();

    // Readers gone: the download goes on in the background, into the pool.
    await f.close();
    await until('the download to complete', () => pool.has(req.digest));
    expect(fetcher.progress(req.digest)).toBeUndefined();
    expect(sha(await fs.readFile(pool.path(req.digest)))).toBe(sha(medium));
    expect(fetcher.stats().files).toBe(1);
    expect(fullGets(req.digest.slice(7)) - fetcher.stats().rangeRequests).toBe(1); // one whole-file download
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(pool.stat().writing).toBe(0);
    expect(pool.stat().bytes).toBe(req.size);
  }, 60_000);

  it('a gzip-stored big file streams too: the head is served early, a far read waits for the download (no Range on gzip)', async () => {
    const content = randomBytes(10 * MiB);
    const z = gzipSync(content, { level: 1 });
    const pusher = new RegistryClient();
    await pusher.pushBlob(`${reg.host}/${REPO}`, sha(z), z).finally(() => pusher.close());
    const req: FetchRequest = { ...reqOf(content), blob: { mediaType: GearMediaType.FileGzip, digest: sha(z), size: z.length } };
    throttleFull(2 * MiB); // ~5 s
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
    const f = fetcher.stream(req);
    const head = Buffer.alloc(64 * 1024);
    expect(await readFull(f, head, 0)).toBe(head.length);
    expect(sha(head)).toBe(sha(content.subarray(0, head.length)));
    expect(fetcher.progress(req.digest)!.written).toBeLessThan(req.size);
    const far = Buffer.alloc(4096);
    expect(await readFull(f, far, 9 * MiB)).toBe(far.length);
    expect(sha(far)).toBe(sha(content.subarray(9 * MiB, 9 * MiB + far.length)));
    expect(fetcher.stats().rangeRequests).toBe(0);
    await f.close();
    await until('the download to complete', () => pool.has(req.digest));
    expect(sha(await fs.readFile(pool.path(req.digest)))).toBe(req.digest);
  }, 60_000);

  it('a queued streamed download whose readers all closed yields to foreground requests, and still completes', async () => {
    const blocker = reqOf(corrupt);
    const req = reqOf(medium);
    const smallReq = reqOf(small);
    const mark = proxy.seen.length;
    proxy.setDecider((r) => (isBlobGet(r) && r.url?.includes(blocker.digest) ? { kind: 'hang' } : undefined));
    fetcher = new Fetcher({ pool, client, timeoutMs: 1_500, maxParallel: 1, maxAttempts: 1 });
    const order: string[] = [];
    const first = fetcher.fetch(blocker).catch(() => order.push('blocker-failed'));
    const f = fetcher.stream(req); // queued behind the blocker
    expect(fetcher.progress(req.digest)?.state).toBe('queued');
    await f.close(); // nobody reads it any more: demoted, but kept
    const smallDone = fetcher.fetch(smallReq, { timeoutMs: 10_000 }).then(() => order.push('small'));
    await first;
    proxy.setDecider(() => undefined);
    await smallDone;
    await until('the streamed download to complete', () => pool.has(req.digest), 30_000);
    expect(order).toEqual(['blocker-failed', 'small']);
    // The small file's GET went out before the big one's.
    const gets = proxy.seen.slice(mark).filter((l) => l.startsWith('GET ') && l.includes('/blobs/'));
    const at = (d: string) => gets.findIndex((l) => l.includes(d));
    expect(at(smallReq.digest)).toBeGreaterThanOrEqual(0);
    expect(at(smallReq.digest)).toBeLessThan(at(req.digest));
  }, 60_000);

  it('resumes a broken raw download with a Range request; the resumed file still verifies', async () => {
    const req = reqOf(medium);
    let n = 0;
    proxy.setDecider((r) => (isBlobGet(r) && !r.headers.range && n++ === 0 ? { kind: 'truncate', bytes: 5 * MiB } : undefined));
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
    const f = fetcher.stream(req);
    const buf = Buffer.alloc(MiB);
    expect(await f.read(buf, 20 * MiB - 10)).toBeGreaterThan(0);
    await until('the download to complete', () => pool.has(req.digest));
    await f.close();
    expect(sha(await fs.readFile(pool.path(req.digest)))).toBe(sha(medium));
    const resumed = proxy.seen.filter((l) => l.includes(req.digest.slice(7))).length;
    expect(resumed).toBeGreaterThanOrEqual(2);
    // blobBytes counts bytes received: about one file, not two.
    expect(fetcher.stats().blobBytes).toBeLessThan(req.size + 6 * MiB);
  }, 60_000);

  it('a read that cannot be served within the deadline fails DeadlineExceeded, never hangs', async () => {
    const req = reqOf(medium);
    proxy.setDecider((r) => (isBlobGet(r) ? { kind: 'hang' } : undefined));
    fetcher = new Fetcher({ pool, client, timeoutMs: 800, maxAttempts: 1 });
    const f = fetcher.stream(req);
    const err = await f.read(Buffer.alloc(4096), 0).catch((e: unknown) => e);
    expect(isClass(err, 'DeadlineExceeded') || isClass(err, 'Unavailable')).toBe(true);
    const err2 = await f.read(Buffer.alloc(4096), 20 * MiB).catch((e: unknown) => e);
    expect(err2).toBeInstanceOf(Error);
    await f.close();
    await until('the download to give up', () => fetcher!.progress(req.digest) === undefined, 10_000);
    expect(pool.has(req.digest)).toBe(false);
  }, 30_000);

  it('corrupted bytes: the file never enters the pool and every later read fails', async () => {
    const req = reqOf(corrupt);
    throttleFull(8 * MiB, { flipAt: 3 * MiB + 17 });
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
    const f = fetcher.stream(req);
    const buf = Buffer.alloc(64 * 1024);
    expect(await readFull(f, buf, 0)).toBe(buf.length); // served before verification: unverified
    await until('the download to end', () => fetcher!.progress(req.digest) === undefined);
    expect(pool.has(req.digest)).toBe(false);
    expect(existsSync(pool.path(req.digest))).toBe(false);
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
    expect(fetcher.stats().verifyFailures).toBe(1);
    const err = await f.read(buf, 0).catch((e: unknown) => e);
    expect(isClass(err, 'Unavailable')).toBe(true);
    expect(String((err as Error).message)).toMatch(/content rejected|does not match/);
    await f.close();
  }, 60_000);

  it('a read far ahead that takes the last byte is served by Range short of it; the last byte waits for verification', async () => {
    const req = reqOf(corrupt);
    throttleFull(4 * MiB, { flipAt: MiB + 5 });
    fetcher = new Fetcher({ pool, client, timeoutMs: 20_000 });
    const f = fetcher.stream(req);
    // The tail, far ahead of the download: a Range request serves all of it but the last byte.
    const tail = Buffer.alloc(4096);
    const at = corrupt.length - tail.length;
    const n = await f.read(tail, at);
    expect(n).toBe(tail.length - 1);
    expect(tail.subarray(0, n).equals(corrupt.subarray(at, at + n))).toBe(true);
    expect(fetcher.stats().rangeRequests).toBeGreaterThanOrEqual(1);
    // The last byte: only once the whole file verified, so a reader that reads to the end learns of the
    // corrupt download (the Range bytes themselves were right).
    const err = await f.read(Buffer.alloc(1), corrupt.length - 1).catch((e: unknown) => e);
    expect(isClass(err, 'Unavailable')).toBe(true);
    expect(fetcher.stats().verifyFailures).toBe(1);
    await f.close();
  }, 60_000);
});

// ---------------------------------------------------------------------------
// End to end: overlay → miss filesystem → streamed reader.

const hdr = indexTarHeader;

async function indexLayer(): Promise<Buffer> {
  const manifest: IndexManifest = {
    version: 1,
    location: { registry: proxy.host, repository: REPO },
    files: [
      { path: 'data/big', digest: sha(big), size: big.length },
      { path: 'data/corrupt', digest: sha(corrupt), size: corrupt.length },
      { path: 'data/small', digest: sha(small), size: small.length },
    ],
  };
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, [hdr('data', 'dir'), hdr('data/big', 'file'), hdr('data/corrupt', 'file'), hdr('data/small', 'file')])) chunks.push(c);
  return Buffer.concat(chunks);
}

/** The store's lazy machinery (the concrete store has it; the LayerStore interface does not). */
function runtimeOf(s: LayerStore): LazyRuntime {
  const rt = (s as unknown as { lazyRuntime?: LazyRuntime }).lazyRuntime;
  if (!rt) throw new Error('the store was opened without lazy pull');
  return rt;
}

async function readAt(file: string, pos: number, len: number): Promise<Buffer> {
  const fh = await fs.open(file, 'r');
  try {
    const buf = Buffer.alloc(len);
    let got = 0;
    while (got < len) {
      const { bytesRead } = await fh.read(buf, got, len - got, pos + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    return buf.subarray(0, got);
  } finally {
    await fh.close();
  }
}

describe('streamed fetch through the miss filesystem', () => {
  let root: string;
  let store: LayerStore | undefined;

  beforeEach(async () => {
    root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-stream-fs-'));
  });

  afterEach(async () => {
    await store?.close?.();
    store = undefined;
    for (const m of mountsUnder(path.join(root, 'layers'))) await run('umount', ['-l', m.mountPoint]);
    for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
    await fs.rm(root, { recursive: true, force: true });
  });

  async function container(fuseOpen?: 'passthrough' | 'none'): Promise<{ merged: string; s: LayerStore }> {
    const s = await openLayerStore({ root, lazy: { fetchTimeoutMs: 30_000, cacheSize: '2GiB', ...(fuseOpen ? { fuseOpen } : {}) } });
    store = s;
    await s.create('idx', '', 'ro');
    await s.applyDiff('idx', '', Readable.from([await indexLayer()]));
    await s.create('ctr', 'idx', 'rw');
    return { merged: await s.get('ctr'), s };
  }

  it('(a) reads the first 64 KiB and (b) bytes near the end of a 256 MiB file while it downloads; (c) the pool has it only once verified', async () => {
    const { merged, s } = await container();
    const lazy = runtimeOf(s);
    const digest = sha(big);
    const file = path.join(merged, 'data/big');
    throttleFull(16 * MiB); // the whole file takes ~16 s

    // (a) the head, served from the staging file
    expect(sha(await readAt(file, 0, 64 * 1024))).toBe(sha(big.subarray(0, 64 * 1024)));
    let p = lazy.fetcher.progress(digest);
    expect(p?.state).toBe('running');
    expect(p!.streaming).toBe(true);
    expect(p!.written).toBeLessThan(big.length);
    expect(lazy.pool.has(digest)).toBe(false);
    expect(existsSync(lazy.pool.path(digest))).toBe(false);

    // (b) near the end, served by a Range request
    const tailAt = big.length - 200_000;
    expect(sha(await readAt(file, tailAt, 64 * 1024))).toBe(sha(big.subarray(tailAt, tailAt + 64 * 1024)));
    expect(lazy.fetcher.stats().rangeRequests).toBeGreaterThanOrEqual(1);
    p = lazy.fetcher.progress(digest);
    expect(p?.state).toBe('running');
    expect(p!.written).toBeLessThan(tailAt);
    expect(lazy.pool.has(digest)).toBe(false);
    // (c) the staging file counts as a write in progress, not as pool content
    expect(lazy.pool.stat().writing).toBe(1);
    expect(lazy.pool.stat().bytes).toBe(0);

    // A small file on the side is fetched whole as before.
    proxy.setDecider(() => undefined);
    expect(sha(await fs.readFile(path.join(merged, 'data/small')))).toBe(sha(small));
    throttleFull(16 * MiB);

    // (c) the whole file enters the pool once its digest verified, and reads whole afterwards
    await until('the download to complete', () => lazy.pool.has(digest));
    expect(lazy.fetcher.progress(digest)).toBeUndefined();
    expect(lazy.pool.stat().writing).toBe(0);
    expect(lazy.pool.stat().bytes).toBe(big.length + small.length);
    const r = await run('sha256sum', [file], { timeoutMs: 60_000 });
    expect(r.stdout.split(' ')[0]).toBe(digest.slice(7));
    expect(lazy.fetcher.stats().files).toBe(2);
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
  }, 180_000);

  it.each(['passthrough', 'none'] as const)('(d) a corrupting registry: the file never enters the pool and reads get EIO (--fuse-open %s)', async (mode) => {
    const { merged, s } = await container(mode);
    const lazy = runtimeOf(s);
    const digest = sha(corrupt);
    const file = path.join(merged, 'data/corrupt');
    throttleFull(8 * MiB, { flipAt: 5 * MiB + 3 });
    const fh = await fs.open(file, 'r');
    try {
      expect((await fh.read(Buffer.alloc(4096), 0, 4096, 0)).bytesRead).toBe(4096); // unverified, served
      await until('the download to end', () => lazy.fetcher.progress(digest) === undefined);
      expect(lazy.fetcher.stats().verifyFailures).toBe(1);
      expect(lazy.pool.has(digest)).toBe(false);
      expect(existsSync(lazy.pool.path(digest))).toBe(false);
      expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
      // The open file: a read the kernel has not cached reaches the reader, which fails; with
      // --fuse-open none (no open file) the daemon's file of the node stays until idle and fails it too,
      // rather than starting a new download for each READ.
      const err = await fh.read(Buffer.alloc(4096), 0, 4096, 9 * MiB).catch((e: unknown) => e);
      expect((err as NodeJS.ErrnoException).code).toBe('EIO');
      expect(lazy.fetcher.stats().verifyFailures).toBe(1);
      expect(lazy.fetcher.progress(digest)).toBeUndefined();
      if (mode === 'none') {
        // The page read first was served unverified and cached; the failed download dropped it
        // (runtime → dropUnverified, written from the threadpool), so reading it again reaches the
        // failed file and gets EIO instead of the cached bytes.
        let again: unknown;
        for (let i = 0; i < 100; i++) {
          again = await fh.read(Buffer.alloc(4096), 0, 4096, 0).catch((e: unknown) => e);
          if ((again as NodeJS.ErrnoException).code === 'EIO') break;
          await new Promise((r) => setTimeout(r, 50));
        }
        expect((again as NodeJS.ErrnoException).code).toBe('EIO');
      }
    } finally {
      await fh.close();
    }
    // A whole read of the file in another process: EIO (the corrupt download is rejected again).
    const r = await run('sha256sum', [file], { timeoutMs: 60_000 });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/Input\/output error/);
    expect(lazy.pool.has(digest)).toBe(false);
    // At most one more download (passthrough: the new open's), not one per READ.
    expect(lazy.fetcher.stats().verifyFailures).toBeLessThanOrEqual(2);
  }, 120_000);
});
