/**
 * The fetcher against a real registry (docker-registry 2.8) and the fault
 * proxy: in-flight dedup, foreground-first scheduling, the deadline (never a
 * hang), verification (a flipped byte never enters the pool), gzip blobs.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { Fetcher, parseDuration, type FetchRequest } from '../../src/core/fetcher/fetcher.js';
import { GearMediaType } from '../../src/core/index/manifest.js';
import { openPool, type Pool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const REPO = 'gear-test/files';
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

let reg: TestRegistry;
let proxy: FaultProxy;
let pusher: RegistryClient;

interface Blob {
  content: Buffer;
  req: FetchRequest;
}

async function pushFile(content: Buffer, host: string, gzip = false): Promise<Blob> {
  const digest = sha(content);
  if (!gzip) {
    await pusher.pushBlob(`${reg.host}/${REPO}`, digest, content);
    return { content, req: { digest, size: content.length, location: { registry: host, repository: REPO } } };
  }
  const z = gzipSync(content);
  await pusher.pushBlob(`${reg.host}/${REPO}`, sha(z), z);
  return {
    content,
    req: {
      digest,
      size: content.length,
      blob: { mediaType: GearMediaType.FileGzip, digest: sha(z), size: z.length },
      location: { registry: host, repository: REPO },
    },
  };
}

const blobGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:'));

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  pusher = new RegistryClient();
}, 60_000);

afterAll(async () => {
  await pusher?.close();
  await proxy?.stop();
  await reg?.stop();
});

let root: string;
let pool: Pool;
let client: RegistryClient;
let fetcher: Fetcher | undefined;

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-fetcher-'));
  pool = await openPool({ root, snapshotDelayMs: 10 });
  client = new RegistryClient({ retry: { maxAttempts: 2, minDelayMs: 50, maxDelayMs: 100, maxTotalMs: 2000 } });
  proxy.setDecider(() => undefined);
});

afterEach(async () => {
  await fetcher?.close();
  fetcher = undefined;
  await client.close();
  await pool.close();
  await fs.rm(root, { recursive: true, force: true });
});

describe('fetcher', () => {
  it('fetches a raw and a gzip-stored file into the pool, verified', async () => {
    const raw = await pushFile(randomBytes(100_000), proxy.host);
    const gz = await pushFile(Buffer.from('hello gear '.repeat(5000)), proxy.host, true);
    fetcher = new Fetcher({ pool, client, timeoutMs: 10_000 });
    await fetcher.fetch(raw.req);
    await fetcher.fetch(gz.req);
    expect(await fs.readFile(pool.path(raw.req.digest))).toEqual(raw.content);
    expect(await fs.readFile(pool.path(gz.req.digest))).toEqual(gz.content);
    const s = fetcher.stats();
    expect(s.files).toBe(2);
    expect(s.bytes).toBe(raw.content.length + gz.content.length);
    expect(s.blobBytes).toBe(raw.content.length + gz.req.blob!.size);
    // Present now: no download.
    const before = blobGets().length;
    await fetcher.fetch(raw.req);
    expect(blobGets().length).toBe(before);
    expect(fetcher.stats().cached).toBe(1);
  });

  it('downloads once however many callers wait', async () => {
    const b = await pushFile(randomBytes(300_000), proxy.host);
    fetcher = new Fetcher({ pool, client, timeoutMs: 10_000 });
    const before = blobGets().length;
    await Promise.all(Array.from({ length: 20 }, () => fetcher!.fetch(b.req)));
    expect(blobGets().length - before).toBe(1);
    expect(fetcher.stats().files).toBe(1);
    expect(fetcher.stats().joined).toBe(19);
  });

  it('starts foreground requests before queued background ones', async () => {
    const bgs = await Promise.all(Array.from({ length: 4 }, () => pushFile(randomBytes(20_000), proxy.host)));
    const fg = await pushFile(randomBytes(20_000), proxy.host);
    const blocker = await pushFile(randomBytes(20_000), proxy.host);
    // The first download hangs until its deadline and holds the only slot.
    proxy.setDecider((req) => (req.url?.includes(blocker.req.digest) && req.method === 'GET' ? { kind: 'hang' } : undefined));
    fetcher = new Fetcher({ pool, client, timeoutMs: 1_500, maxParallel: 1, maxAttempts: 1 });
    const order: string[] = [];
    const first = fetcher.fetch(blocker.req).catch(() => order.push('blocker-failed'));
    const bgDone = bgs.map((b, i) => fetcher!.fetch(b.req, { priority: 'background', timeoutMs: 10_000 }).then(() => order.push(`bg${i}`)));
    const fgDone = fetcher.fetch(fg.req, { priority: 'foreground', timeoutMs: 10_000 }).then(() => order.push('fg'));
    expect(fetcher.stats().queued).toBe(5);
    await first;
    proxy.setDecider(() => undefined);
    await Promise.all([...bgDone, fgDone]);
    expect(order[0]).toBe('blocker-failed');
    expect(order[1]).toBe('fg');
    expect(order.slice(2).sort()).toEqual(['bg0', 'bg1', 'bg2', 'bg3']);
  });

  it('gives a waiting reader DeadlineExceeded within the deadline when the registry hangs', async () => {
    const b = await pushFile(randomBytes(10_000), proxy.host);
    proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'hang' } : undefined));
    fetcher = new Fetcher({ pool, client, timeoutMs: 800 });
    const t0 = Date.now();
    const err = await fetcher.fetch(b.req).catch((e: unknown) => e);
    const took = Date.now() - t0;
    expect(isClass(err, 'DeadlineExceeded')).toBe(true);
    expect(took).toBeLessThan(3_000);
    expect(pool.has(b.req.digest)).toBe(false);
    // The slot is freed: after the fault is gone, the same digest can be fetched.
    proxy.setDecider(() => undefined);
    await fetcher.fetch(b.req);
    expect(pool.has(b.req.digest)).toBe(true);
  });

  it('rejects flipped bytes: nothing enters the pool, the caller gets an error', async () => {
    const b = await pushFile(randomBytes(50_000), proxy.host);
    const z = await pushFile(Buffer.from('compressible '.repeat(4000)), proxy.host, true);
    proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'flip' } : undefined));
    fetcher = new Fetcher({ pool, client, timeoutMs: 5_000 });
    for (const x of [b, z]) {
      const err = await fetcher.fetch(x.req).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(Error);
      expect(pool.has(x.req.digest)).toBe(false);
      expect(existsSync(pool.path(x.req.digest))).toBe(false);
    }
    expect(fetcher.stats().verifyFailures).toBe(2);
    expect(await fs.readdir(path.join(root, 'pool', '.staging'))).toEqual([]);
  });

  it('fails fast with NotFound for a blob the registry lacks, and survives a 503 burst', async () => {
    const missing: FetchRequest = { digest: sha(Buffer.from('never pushed')), size: 12, location: { registry: proxy.host, repository: REPO } };
    fetcher = new Fetcher({ pool, client, timeoutMs: 5_000 });
    const err = await fetcher.fetch(missing).catch((e: unknown) => e);
    expect(isClass(err, 'NotFound')).toBe(true);
    const b = await pushFile(randomBytes(1000), proxy.host);
    let n = 0;
    proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') && n++ < 1 ? { kind: 'status', status: 503 } : undefined));
    await fetcher.fetch(b.req);
    expect(pool.has(b.req.digest)).toBe(true);
  });

  it('parses durations', () => {
    expect(parseDuration('60')).toBe(60_000);
    expect(parseDuration('2s')).toBe(2_000);
    expect(parseDuration('500ms')).toBe(500);
    expect(parseDuration('1m')).toBe(60_000);
    expect(() => parseDuration('soon')).toThrow();
  });
});
