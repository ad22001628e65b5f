/**
 * Recovery after registry faults (a hostile node:http registry on loopback):
 * a dead Bearer token realm does not poison the registry's auth state; a
 * streamed file's reads honour the fetch deadline while the registry trickles
 * and work again as soon as it is healthy, even while the slow connection
 * lives; a file larger than the pool cap is refused before any byte is written.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { StallWatch } from '../../src/core/fetcher/body.js';
import { GearError, isClass } from '../../src/core/errors.js';
import { Fetcher, type FetchRequest, type StreamedFile } from '../../src/core/fetcher/fetcher.js';
import { openPool, type Pool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { serve, startHostileRegistry, status, trickle, type Behaviour, type HostileRegistry } from '../helpers/hostile-registry.js';

const REPO = 'hostile/recovery';
const TIMEOUT = 1500;
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const content = randomBytes(256 * 1024);

let reg: HostileRegistry;
let deadPort: number;
let root: string;
let pool: Pool;
let client: RegistryClient;
let fetcher: Fetcher;
const crashes: unknown[] = [];
const onCrash = (e: unknown) => crashes.push(e);

beforeAll(async () => {
  process.on('uncaughtException', onCrash);
  process.on('unhandledRejection', onCrash);
  reg = await startHostileRegistry();
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  deadPort = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
});
afterAll(async () => {
  process.off('uncaughtException', onCrash);
  process.off('unhandledRejection', onCrash);
  await reg?.stop();
});
beforeEach(async () => {
  crashes.length = 0;
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-recovery-'));
  pool = await openPool({ root, snapshotDelayMs: 10, capBytes: '1MiB' });
  client = new RegistryClient({ retry: { maxAttempts: 3, minDelayMs: 10, maxDelayMs: 50, maxTotalMs: 1000 }, connectTimeoutMs: 1000 });
  fetcher = new Fetcher({ pool, client, timeoutMs: TIMEOUT });
});
afterEach(async () => {
  await fetcher.close();
  await client.close();
  await pool.close();
  await fs.rm(root, { recursive: true, force: true });
  expect(crashes).toEqual([]);
});

const req = (c: Buffer = content): FetchRequest => ({ digest: sha(c), size: c.length, location: { registry: reg.host, repository: REPO } });
const blobGets = () => reg.log.filter((l) => l.startsWith('GET ') && l.includes('/blobs/'));

/** Bearer auth with tokens from `realm`; the token server is this registry's /token. */
function bearer(realm: string, inner: Behaviour): Behaviour {
  return (ctx) => {
    if (ctx.req.url?.startsWith('/token')) return status(ctx, 200, {}, JSON.stringify({ token: 'GOOD', expires_in: 300 }));
    if (ctx.token !== 'GOOD') return status(ctx, 401, { 'www-authenticate': `Bearer realm="${realm}",service="hostile"` });
    return inner(ctx);
  };
}

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<never>((_, rej) => (timer = setTimeout(() => rej(new Error(`HANG: ${what} not settled in ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Reads [pos, pos+len) like the miss filesystem: short reads continue until the request is full. */
async function fill(f: StreamedFile, pos: number, len: number): Promise<Buffer> {
  const out = Buffer.alloc(len);
  let got = 0;
  for (let i = 0; got < len && i < 1_000_000; i++) {
    const n = await f.read(out.subarray(got), pos + got);
    if (n === 0) break;
    got += n;
  }
  return out.subarray(0, got);
}

describe('token realm failures', () => {
  it('a dead token realm does not poison the registry: once its challenge names a live realm, the next fetch reaches it', async () => {
    reg.set(bearer(`http://127.0.0.1:${deadPort}/token`, (c) => serve(c, content)));
    const err = await fetcher.fetch(req()).catch((e: unknown) => e);
    expect(isClass(err, 'Unavailable'), String(err)).toBe(true);
    expect((err as Error).message).toMatch(/token/);
    // The registry is healthy again (its challenge names a realm that answers).
    reg.set(bearer(`http://${reg.host}/token`, (c) => serve(c, content)));
    await within(fetcher.fetch(req()), TIMEOUT + 1000, 'fetch after the realm recovered');
    expect(blobGets().length).toBeGreaterThanOrEqual(1);
    expect(reg.log.some((l) => l.startsWith('GET /token'))).toBe(true);
    expect((await fs.readFile(pool.path(req().digest))).equals(content)).toBe(true);
  });

  it('a dead token realm: a registry that stops asking for auth is used at once', async () => {
    reg.set(bearer(`http://127.0.0.1:${deadPort}/token`, (c) => serve(c, content)));
    await expect(fetcher.fetch(req())).rejects.toBeInstanceOf(GearError);
    reg.set((c) => serve(c, content));
    await within(fetcher.fetch(req()), TIMEOUT + 1000, 'fetch from the open registry');
    expect(blobGets()).toHaveLength(1);
  });
});

describe('streamed reads against a trickling registry', () => {
  it('each read fails within the fetch deadline; once the registry is healthy the next read gets the bytes, while the slow connection still lives', async () => {
    // 1 byte every 200 ms: never idle for long, never useful.
    reg.set((c) => trickle(c, content, 1, 200));
    const f = fetcher.stream(req());
    try {
      const started = Date.now();
      const err = await within(fill(f, 0, 128 * 1024), TIMEOUT + 1500, 'read of a trickling file').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(GearError);
      expect((err as Error).message).not.toMatch(/^HANG/);
      expect(Date.now() - started).toBeLessThan(TIMEOUT + 1500);
      // Healthy now; the trickling connection is kept open (it is the registry's, not ours, to close).
      reg.set((c) => serve(c, content), { keepConnections: true });
      const got = await within(fill(f, 0, 128 * 1024), TIMEOUT + 1500, 'read after recovery');
      expect(got.equals(content.subarray(0, 128 * 1024))).toBe(true);
      const tail = await within(fill(f, 128 * 1024, content.length - 128 * 1024), TIMEOUT + 1500, 'read of the rest');
      expect(tail.equals(content.subarray(128 * 1024))).toBe(true);
      expect(blobGets().length).toBeGreaterThanOrEqual(1);
    } finally {
      await f.close();
    }
  });
});

describe('pool admission (cap 1 MiB)', () => {
  const until = async (cond: () => boolean, what: string) => {
    for (let i = 0; i < 300 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
    expect(cond(), what).toBe(true);
  };

  it('a file larger than the cap is served to the opener but does not stay in the pool', async () => {
    const big = randomBytes(1024 * 1024 + 4096);
    reg.set((c) => serve(c, big));
    // As the miss filesystem does: pin, fetch, open, release.
    const release = pool.pin(sha(big));
    await fetcher.fetch(req(big));
    const fh = await pool.open(sha(big));
    release();
    expect(fh).toBeDefined();
    try {
      await until(() => !pool.has(sha(big)), 'the oversize file evicted once released');
      expect(pool.stat().bytes).toBeLessThanOrEqual(pool.stat().capBytes);
      const got = Buffer.alloc(big.length);
      const { bytesRead } = await fh!.read(got, 0, got.length, 0);
      expect(bytesRead).toBe(big.length);
      expect(got.equals(big)).toBe(true);
    } finally {
      await fh?.close();
    }
    // The next open fetches it again.
    const before = blobGets().length;
    const again = pool.pin(sha(big));
    await fetcher.fetch(req(big));
    again();
    expect(blobGets().length).toBe(before + 1);
  });

  it('a streamed file larger than the cap: its readers get every byte, the pool keeps nothing', async () => {
    const big = randomBytes(3 * 1024 * 1024);
    reg.set((c) => serve(c, big));
    const f = fetcher.stream(req(big));
    try {
      const got = await within(fill(f, 0, big.length), TIMEOUT + 3000, 'streamed read of an oversize file');
      expect(got.equals(big)).toBe(true);
      await until(() => fetcher.progress(sha(big)) === undefined && !pool.has(sha(big)), 'the download ended and the file was evicted');
      expect(pool.stat().bytes).toBeLessThanOrEqual(pool.stat().capBytes);
      await until(() => pool.stat().counters.evictions >= 1, 'the eviction counted');
    } finally {
      await f.close();
    }
  });

  it('a file that fits stays', async () => {
    const fits = randomBytes(512 * 1024);
    reg.set((c) => serve(c, fits));
    await fetcher.fetch(req(fits));
    await new Promise((r) => setTimeout(r, 50));
    expect(pool.has(sha(fits))).toBe(true);
  });
});

describe('stall watch (body idle timeout with a progress floor)', () => {
  it('fires when less than the floor arrived in a window, not while enough arrives, and asks no more than what is left', () => {
    vi.useFakeTimers();
    try {
      let now = 0;
      let left = 1_000_000;
      const stalls: number[] = [];
      const w = new StallWatch({ windowMs: 1000, minBytes: 1000, remaining: () => left, onStall: (idle) => stalls.push(idle), now: () => now });
      let bytes = 0;
      let watch = w;
      const tick = (ms: number, add: number) => {
        for (let i = 0; i < ms / 100; i++) {
          now += 100;
          bytes += add;
          watch.progress(bytes);
          vi.advanceTimersByTime(100);
        }
      };
      tick(3000, 200); // 2,000 bytes a second: fine
      expect(stalls).toEqual([]);
      tick(900, 1); // a trickle: 9 bytes in 0.9 s, not yet a window
      expect(stalls).toEqual([]);
      tick(300, 1); // the window passes with less than the floor
      expect(stalls).toHaveLength(1);
      expect(stalls[0]).toBeGreaterThanOrEqual(1000);
      w.stop();

      // Near the end of the file the floor is what is left: 300 bytes in time is progress.
      left = 300;
      stalls.length = 0;
      bytes = 0;
      const w2 = new StallWatch({ windowMs: 1000, minBytes: 1000, remaining: () => left - bytes, onStall: (idle) => stalls.push(idle), now: () => now });
      watch = w2;
      tick(500, 60); // all 300 bytes within 0.5 s
      tick(800, 0); // 1.3 s after the start: the last useful progress was 0.8 s ago
      expect(stalls).toHaveLength(0);
      w2.stop();
    } finally {
      vi.useRealTimers();
    }
  });
});
