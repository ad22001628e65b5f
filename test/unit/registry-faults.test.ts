/**
 * Registry fault corpus: one `it` per hostile registry behaviour, run through
 * the real fetcher (pool writer, registry client, undici) against a hostile
 * node:http registry of our own on loopback (test/helpers/hostile-registry.ts).
 *
 * Every case must end in the right bytes or a clear error (a GearError with a
 * message), never in a crash (no uncaught exception or unhandled rejection,
 * watched by process listeners), never in a hang past the fetch deadline
 * (each case is raced against deadline + a margin), and never with wrong
 * bytes in the pool (a failed case leaves nothing there, a passing one leaves
 * exactly the content).
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { createServer } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { GearError, type ErrorClass } from '../../src/core/errors.js';
import { Fetcher, type FetchRequest, type StreamedFile } from '../../src/core/fetcher/fetcher.js';
import { GearMediaType } from '../../src/core/index/manifest.js';
import { openPool, type Pool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import {
  raw,
  resetAfter,
  resetFraction,
  resetNow,
  resetAtOffset,
  serve,
  stallAfter,
  startHostileRegistry,
  status,
  trickle,
  type Behaviour,
  type HostileCtx,
  type HostileRegistry,
} from '../helpers/hostile-registry.js';

const REPO = 'hostile/files';
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
/**
 * The fetch deadline (GEAR_FETCH_TIMEOUT) of the cases that end at it (slow, hanging registries),
 * and of the others: long enough that their retries end first even on a loaded machine, so the
 * error they end with is the registry's, not the deadline.
 */
const SHORT_TIMEOUT = 1500;
const LONG_TIMEOUT = 4000;
/** How much longer than the deadline a case may take before it counts as a hang. */
const MARGIN = 2500;

const content = randomBytes(64 * 1024);
const gz = gzipSync(content);
/** A gzip bomb: 64 MiB of zeros in ~64 KiB, declared as a 64 KiB file. */
const bomb = gzipSync(Buffer.alloc(64 * 1024 * 1024));
/** A 1 MiB file for the cap case. */
const large = randomBytes(1024 * 1024);

// ------------------------------------------------------------------ crash watch

const crashes: unknown[] = [];
const onCrash = (e: unknown) => crashes.push(e);
beforeAll(() => {
  process.on('uncaughtException', onCrash);
  process.on('unhandledRejection', onCrash);
});
afterAll(() => {
  process.off('uncaughtException', onCrash);
  process.off('unhandledRejection', onCrash);
});

// ------------------------------------------------------------------ fixtures

let reg: HostileRegistry;
/** A second hostile server (redirect target / token realm on another origin). */
let other: HostileRegistry;
/** A loopback port nobody listens on. */
let deadPort: number;

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

beforeAll(async () => {
  reg = await startHostileRegistry();
  other = await startHostileRegistry();
  deadPort = await freePort();
});
afterAll(async () => {
  await reg?.stop();
  await other?.stop();
});

let root: string;
let pool: Pool;
let client: RegistryClient;
let fetcher: Fetcher;

beforeEach(async () => {
  crashes.length = 0;
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-faults-'));
});
afterEach(async () => {
  await fetcher?.close();
  await client?.close();
  await pool?.close();
  await fs.rm(root, { recursive: true, force: true });
  reg.set(({ res }) => void res.writeHead(404).end());
  other.set(({ res }) => void res.writeHead(404).end());
});

async function setup(timeoutMs: number, opts: { cap?: number; range?: boolean } = {}): Promise<void> {
  pool = await openPool({ root, snapshotDelayMs: 10, ...(opts.cap ? { capBytes: opts.cap } : {}) });
  client = new RegistryClient({ retry: { maxAttempts: 3, minDelayMs: 10, maxDelayMs: 50, maxTotalMs: 1000 }, connectTimeoutMs: 1000 });
  // range: every read ahead of the download is served by a Range request of a 16 KiB chunk.
  fetcher = new Fetcher({ pool, client, timeoutMs, ...(opts.range ? { rangeAheadBytes: 0, rangeChunkBytes: 16 * 1024 } : {}) });
}

type Mode = 'raw' | 'gzip' | 'bomb' | 'large';

function requestOf(mode: Mode, registry = reg.host): { req: FetchRequest; served: Buffer; want: Buffer } {
  const location = { registry, repository: REPO };
  switch (mode) {
    case 'raw':
      return { req: { digest: sha(content), size: content.length, location }, served: content, want: content };
    case 'large':
      return { req: { digest: sha(large), size: large.length, location }, served: large, want: large };
    case 'gzip':
      return {
        req: { digest: sha(content), size: content.length, blob: { mediaType: GearMediaType.FileGzip, digest: sha(gz), size: gz.length }, location },
        served: gz,
        want: content,
      };
    case 'bomb':
      return {
        req: { digest: sha(content), size: content.length, blob: { mediaType: GearMediaType.FileGzip, digest: sha(bomb), size: bomb.length }, location },
        served: bomb,
        want: content,
      };
  }
}

/** Fills buf from position like the miss filesystem does (short reads continue). */
async function readAll(f: StreamedFile, size: number): Promise<Buffer> {
  const out = Buffer.alloc(size);
  let got = 0;
  for (let i = 0; got < size && i < 100_000; i++) {
    const n = await f.read(out.subarray(got, Math.min(size, got + 128 * 1024)), got);
    if (n === 0) break;
    got += n;
  }
  return out.subarray(0, got);
}

async function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`HANG: ${what} not settled within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, hang]);
  } finally {
    clearTimeout(timer);
  }
}

async function stagingFiles(): Promise<string[]> {
  return fs.readdir(path.join(root, 'pool', '.staging')).catch(() => []);
}

// ------------------------------------------------------------------ behaviours

/** Bearer auth in front of `inner`: 401 + challenge without a token, tokens from `realm`. */
function bearer(realm: () => string, inner: Behaviour, token = 'T0K3N'): Behaviour {
  return (ctx) => {
    if (ctx.req.url?.startsWith('/token')) return status(ctx, 200, {}, JSON.stringify({ token, expires_in: 300 }));
    if (ctx.token !== token) {
      return status(ctx, 401, { 'www-authenticate': `Bearer realm="${realm()}",service="hostile",scope="repository:${REPO}:pull"` });
    }
    return inner(ctx);
  };
}
const ownRealm = () => `http://${reg.host}/token`;

/** `first` for the first `times` blob GETs, then a healthy registry. */
const times =
  (count: number, first: (ctx: HostileCtx, served: Buffer) => unknown) =>
  (served: Buffer): Behaviour =>
  (ctx) =>
    ctx.blobN > 0 && ctx.blobN <= count ? first(ctx, served) : serve(ctx, served);
const always =
  (first: (ctx: HostileCtx, served: Buffer) => unknown) =>
  (served: Buffer): Behaviour =>
  (ctx) =>
    first(ctx, served);

interface Case {
  name: string;
  mode?: Mode;
  /**
   * Read through Fetcher.stream (the big-file path) instead of fetch(); 'range': every read is
   * served by Range requests (the full download only ever gets headers), as far-ahead reads are;
   * all but the last byte is read (Range never serves it: it waits for the verified download).
   */
  stream?: boolean | 'range';
  behaviour: (served: Buffer) => Behaviour;
  /** 'ok': the right bytes end in the pool. Otherwise the error class (and message) expected. */
  expect: 'ok' | 'either' | { class: ErrorClass | ErrorClass[]; message?: RegExp };
  cap?: number;
  /** The file is larger than the cap: once read, it must not stay in the pool. */
  transient?: boolean;
  /** Extra checks on the hostile registry's log. */
  check?: (log: string[]) => void;
}

const blobGets = (log: string[]) => log.filter((l) => l.startsWith('GET ') && l.includes('/blobs/'));
const half = content.length >> 1;
const most = content.length - 100;
const flip = (b: Buffer, at: number) => {
  const c = Buffer.from(b);
  c[at] = c[at]! ^ 0xff;
  return c;
};
const unavailable = { class: 'Unavailable' as const };
const deadline = { class: ['DeadlineExceeded', 'Unavailable'] as ErrorClass[] };
const rejected = { class: 'Unavailable' as const, message: /content rejected|does not match|more than the expected/ };

const cases: Case[] = [
  // --- healthy baselines
  { name: 'healthy raw blob', behaviour: always(serve), expect: 'ok' },
  { name: 'healthy gzip-stored blob', mode: 'gzip', behaviour: always(serve), expect: 'ok' },
  { name: 'healthy streamed read', stream: true, behaviour: always(serve), expect: 'ok' },

  // --- down / refused / reset before any answer
  { name: 'registry down (connection refused)', behaviour: () => () => undefined, expect: unavailable }, // replaced by deadPort below
  { name: 'reset before the headers, every time', behaviour: always((ctx) => ctx.req.socket.resetAndDestroy()), expect: unavailable },
  { name: 'reset before the headers once, then healthy', behaviour: times(1, (ctx) => ctx.req.socket.resetAndDestroy()), expect: 'ok' },
  { name: 'connection closed (FIN) before the headers, every time', behaviour: always((ctx) => ctx.req.socket.end()), expect: unavailable },

  // --- reset mid-body at several offsets
  { name: 'headers only then reset, every time', behaviour: always((c, s) => resetAfter(c, s, 0)), expect: unavailable },
  { name: 'headers only then reset once', behaviour: times(1, (c, s) => resetAfter(c, s, 0)), expect: 'ok' },
  { name: 'a few bytes then reset, every time', behaviour: always((c, s) => resetAfter(c, s, 10)), expect: unavailable },
  { name: 'a few bytes then reset at the same offset, every time (Range resumes past it)', behaviour: always((c, s) => resetAtOffset(c, s, 10)), expect: 'ok' },
  {
    name: 'a few bytes then reset once (resumes by Range)',
    behaviour: times(1, (c, s) => resetAfter(c, s, 10)),
    expect: 'ok',
    check: (log) => expect(blobGets(log).some((l) => / range=10-$/.test(l))).toBe(true),
  },
  { name: 'half the body then reset, every time', behaviour: always((c, s) => resetFraction(c, s, 0.5)), expect: unavailable },
  { name: 'most of the body then reset, every time', behaviour: always((c, s) => resetFraction(c, s, 0.99)), expect: unavailable },
  {
    name: 'most of the body then reset once (resumes by Range)',
    behaviour: times(1, (c, s) => resetAfter(c, s, most)),
    expect: 'ok',
    check: (log) => expect(blobGets(log).some((l) => l.endsWith(` range=${most}-`))).toBe(true),
  },
  { name: 'headers, a few bytes and a reset at once, every time', behaviour: always((c, s) => resetNow(c, s, 10)), expect: unavailable },
  { name: 'headers and a reset at once, once (the reset lands while the pool file opens)', behaviour: times(1, (c, s) => resetNow(c, s, 0)), expect: 'ok' },
  { name: 'gzip: headers and a reset at once, every time', mode: 'gzip', behaviour: always((c, s) => resetNow(c, s, 0)), expect: unavailable },
  { name: 'streamed: headers, a few bytes and a reset at once, once', stream: true, behaviour: times(1, (c, s) => resetNow(c, s, 10)), expect: 'ok' },
  { name: 'every answer resets 1 KiB further (progress each attempt, not enough)', behaviour: always((c, s) => resetAfter(c, s, 1024)), expect: unavailable },
  { name: 'gzip: a few bytes then reset once (starts over)', mode: 'gzip', behaviour: times(1, (c, s) => resetAfter(c, s, 10)), expect: 'ok' },
  { name: 'gzip: most of the body then reset, every time', mode: 'gzip', behaviour: always((c, s) => resetAfter(c, s, s.length - 50)), expect: unavailable },
  { name: 'gzip: the body ends early (truncated gzip, clean close)', mode: 'gzip', behaviour: always((c, s) => (c.res.writeHead(200, {}), c.res.end(s.subarray(0, s.length >> 1)))), expect: unavailable },
  { name: 'streamed: headers only then reset once', stream: true, behaviour: times(1, (c, s) => resetAfter(c, s, 0)), expect: 'ok' },
  { name: 'streamed: half the body then reset, every time', stream: true, behaviour: always((c, s) => resetFraction(c, s, 0.5)), expect: unavailable },
  { name: 'streamed: most of the body then reset once', stream: true, behaviour: times(1, (c, s) => resetAfter(c, s, most)), expect: 'ok' },

  // --- status codes
  { name: '503 every time (retried, then a clear error)', behaviour: always((c) => status(c, 503)), expect: unavailable, check: (log) => expect(blobGets(log).length).toBeGreaterThan(1) },
  { name: '503 twice then healthy', behaviour: times(2, (c) => status(c, 503)), expect: 'ok' },
  { name: '500 every time', behaviour: always((c) => status(c, 500)), expect: unavailable },
  { name: '502 once then healthy', behaviour: times(1, (c) => status(c, 502)), expect: 'ok' },
  { name: '504 once then healthy', behaviour: times(1, (c) => status(c, 504)), expect: 'ok' },
  { name: '429 with Retry-After: 0 once then healthy', behaviour: times(1, (c) => status(c, 429, { 'retry-after': '0' })), expect: 'ok' },
  { name: '429 with a huge Retry-After every time (bounded)', behaviour: always((c) => status(c, 429, { 'retry-after': '999999' })), expect: deadline },
  { name: '404 blob unknown', behaviour: always((c) => status(c, 404, {}, '{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}')), expect: { class: 'NotFound', message: /404/ } },
  { name: '403 denied', behaviour: always((c) => status(c, 403)), expect: { class: 'PermissionDenied', message: /docker login|credentials/ } },
  { name: '401 without a challenge', behaviour: always((c) => status(c, 401)), expect: { class: 'PermissionDenied', message: /docker login|credentials/ } },
  { name: '401 Bearer, token realm healthy', behaviour: (s) => bearer(ownRealm, (c) => serve(c, s)), expect: 'ok' },
  {
    name: '401 Bearer, token rejected by the registry (401 again)',
    behaviour: () => (ctx) =>
      ctx.req.url?.startsWith('/token') ? status(ctx, 200, {}, '{"token":"bad"}') : status(ctx, 401, { 'www-authenticate': `Bearer realm="${ownRealm()}",service="hostile"` }),
    expect: { class: 'PermissionDenied' },
  },
  {
    name: '401 Bearer, token realm refuses connections',
    behaviour: (s) => bearer(() => `http://127.0.0.1:${deadPort}/token`, (c) => serve(c, s)),
    expect: { class: 'Unavailable', message: /token/ },
  },
  {
    name: '401 Bearer, token server answers 500',
    behaviour: (s) => (ctx) => (ctx.req.url?.startsWith('/token') ? status(ctx, 500) : bearer(ownRealm, (c) => serve(c, s))(ctx)),
    expect: { class: 'Unavailable', message: /token/ },
  },
  {
    name: '401 Bearer, token response is not JSON',
    behaviour: (s) => (ctx) => (ctx.req.url?.startsWith('/token') ? status(ctx, 200, {}, '<html>') : bearer(ownRealm, (c) => serve(c, s))(ctx)),
    expect: { class: 'Unavailable', message: /not JSON/ },
  },
  {
    name: '401 Bearer, token response has a token with a newline (header injection)',
    behaviour: (s) => (ctx) => (ctx.req.url?.startsWith('/token') ? status(ctx, 200, {}, '{"token":"a\\r\\nx-evil: 1"}') : bearer(ownRealm, (c) => serve(c, s))(ctx)),
    expect: { class: 'Unavailable', message: /usable token/ },
  },
  {
    name: '401 Bearer, token realm resets mid-answer once',
    behaviour: (s) => {
      let tokenCalls = 0;
      return (ctx) => (ctx.req.url?.startsWith('/token') && ++tokenCalls === 1 ? ctx.req.socket.resetAndDestroy() : bearer(ownRealm, (c) => serve(c, s))(ctx));
    },
    expect: 'ok',
  },

  // --- wrong bytes
  { name: 'one byte flipped in the middle', behaviour: always((c, s) => serve(c, flip(s, half))), expect: rejected },
  { name: 'last byte flipped', behaviour: always((c, s) => serve(c, flip(s, s.length - 1))), expect: rejected },
  { name: 'entirely different bytes of the right length', behaviour: always((c) => serve(c, randomBytes(content.length))), expect: rejected },
  { name: 'streamed: one byte flipped (every read of the end fails)', stream: true, behaviour: always((c, s) => serve(c, flip(s, 100))), expect: rejected },
  { name: 'gzip: corrupt deflate data', mode: 'gzip', behaviour: always((c, s) => serve(c, flip(s, s.length >> 1))), expect: rejected },
  { name: 'gzip: the blob is not gzip at all', mode: 'gzip', behaviour: always((c) => serve(c, randomBytes(gz.length))), expect: rejected },
  { name: 'gzip bomb (64 MiB of zeros declared as a 64 KiB file)', mode: 'bomb', behaviour: always(serve), expect: rejected },
  { name: 'Content-Encoding: gzip on a raw blob (not decoded, rejected)', behaviour: always((c, s) => serve(c, gzipSync(s), { 'content-encoding': 'gzip' })), expect: unavailable },

  // --- lengths
  { name: 'Content-Length larger than the body (short body, then close)', behaviour: always((c, s) => (c.res.writeHead(200, { 'content-length': String(s.length) }), c.res.write(s.subarray(0, half)), setTimeout(() => c.req.socket.end(), 20))), expect: unavailable },
  { name: 'Content-Length smaller than the declared size', behaviour: always((c, s) => serve(c, s.subarray(0, half))), expect: unavailable },
  { name: 'Content-Length larger than the declared size', behaviour: always((c, s) => serve(c, Buffer.concat([s, s]))), expect: unavailable },
  {
    name: 'body longer than its Content-Length (extra bytes later on the connection)',
    behaviour: always((c, s) => (c.res.writeHead(200, { 'content-length': String(s.length) }), c.res.end(s), setTimeout(() => c.req.socket.write(Buffer.alloc(4096, 1)), 30))),
    expect: 'ok',
  },
  {
    name: 'body longer than its Content-Length (extra bytes in the same write)',
    behaviour: always((c, s) => (c.res.writeHead(200, { 'content-length': String(s.length) }), c.res.socket!.write(Buffer.concat([s, Buffer.alloc(4096, 1)])))),
    expect: 'either',
  },
  { name: 'no Content-Length (chunked), right body', behaviour: always((c, s) => (c.res.writeHead(200, {}), c.res.end(s))), expect: 'ok' },
  // A resumed request may then be served from the full body (Range ignored), where the excess is cut off: either way no wrong byte.
  { name: 'no Content-Length (chunked), body longer than declared', behaviour: always((c, s) => (c.res.writeHead(200, {}), c.res.end(Buffer.concat([s, Buffer.alloc(10)])))), expect: 'either' },
  { name: 'no Content-Length (chunked), body shorter than declared', behaviour: always((c, s) => (c.res.writeHead(200, {}), c.res.end(s.subarray(0, half)))), expect: unavailable },
  { name: 'no Content-Length, Connection: close, right body', behaviour: always((c, s) => raw(c, Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n'), s]))), expect: 'ok' },
  { name: 'Content-Length not a number', behaviour: always((c, s) => raw(c, Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\ncontent-length: 12abc\r\n\r\n`), s]))), expect: unavailable },

  // --- Range answers on resume
  { name: 'resume: registry ignores Range (200 full body)', behaviour: (s) => (ctx) => (ctx.blobN === 1 ? resetAfter(ctx, s, half) : (ctx.res.writeHead(200, { 'content-length': String(s.length) }), ctx.res.end(s))), expect: 'ok' },
  {
    name: 'resume: 206 with a wrong Content-Range every time',
    behaviour: (s) => (ctx) => (ctx.blobN === 1 ? resetAfter(ctx, s, half) : (ctx.res.writeHead(206, { 'content-range': `bytes 0-99/${s.length}`, 'content-length': '100' }), ctx.res.end(s.subarray(0, 100)))),
    expect: unavailable,
  },
  { name: 'resume: 416 Range Not Satisfiable', behaviour: (s) => (ctx) => (ctx.blobN === 1 ? resetAfter(ctx, s, half) : status(ctx, 416)), expect: { class: ['InvalidArgument', 'Unavailable'] } },

  // --- garbage
  { name: 'garbage instead of an HTTP answer', behaviour: always((c) => raw(c, 'SSH-2.0-OpenSSH_9.2\r\n\r\n')), expect: unavailable },
  { name: 'invalid status line then reset', behaviour: always((c) => raw(c, 'HTTP/1.1 2OO OK\r\n\r\n', true)), expect: unavailable },

  // --- slow, trickling, hanging
  { name: 'slow but within the deadline (64 KiB over ~0.5 s)', behaviour: always((c, s) => trickle(c, s, 8192, 60)), expect: 'ok' },
  { name: 'trickling 16 bytes every 100 ms (past the deadline)', behaviour: always((c, s) => trickle(c, s, 16, 100)), expect: deadline },
  { name: 'accepts and never answers', behaviour: () => () => undefined, expect: deadline },
  { name: 'headers, half the body, then silence', behaviour: always((c, s) => stallAfter(c, s, half)), expect: deadline },
  { name: 'streamed: trickling 16 bytes every 100 ms', stream: true, behaviour: always((c, s) => trickle(c, s, 16, 100)), expect: deadline },
  { name: 'streamed: headers, half the body, then silence', stream: true, behaviour: always((c, s) => stallAfter(c, s, half)), expect: deadline },

  // --- redirects
  { name: 'redirect to a healthy other origin', behaviour: (s) => (ctx) => (other.set((c) => serve(c, s)), status(ctx, 307, { location: `http://${other.host}/blob` })), expect: 'ok' },
  { name: 'redirect loop', behaviour: () => (ctx) => status(ctx, 302, { location: ctx.req.url ?? '/' }), expect: { class: 'Unavailable', message: /redirect/ } },
  { name: 'redirect to a refused port', behaviour: () => (ctx) => status(ctx, 307, { location: `http://127.0.0.1:${deadPort}/blob` }), expect: unavailable },
  { name: 'redirect to a non-http scheme', behaviour: () => (ctx) => status(ctx, 307, { location: 'file:///etc/passwd' }), expect: { class: 'Unavailable', message: /scheme/ } },

  // --- far-ahead reads by Range (the full download stalls after its headers)
  ...(
    [
      { name: 'range reads: healthy 206 answers', first: serve, expect: 'ok' },
      { name: 'range reads: a reset mid-chunk once (the chunk is asked again)', first: (c: HostileCtx, s: Buffer) => resetAfter(c, s, 100), once: true, expect: 'ok' },
      { name: 'range reads: a reset mid-chunk every time', first: (c: HostileCtx, s: Buffer) => resetAfter(c, s, 100), expect: unavailable },
      { name: 'range reads: the registry ignores Range (200 with the full body)', first: (c: HostileCtx, s: Buffer) => (c.res.writeHead(200, { 'content-length': String(s.length) }), c.res.end(s)), expect: 'ok' },
      {
        name: 'range reads: 206 with a Content-Range of other bytes',
        first: (c: HostileCtx, s: Buffer) => (c.res.writeHead(206, { 'content-range': `bytes 0-99/${s.length}`, 'content-length': '100' }), c.res.end(s.subarray(0, 100))),
        expect: unavailable,
      },
      {
        name: 'range reads: 206 whose Content-Length does not match its range',
        first: (c: HostileCtx, s: Buffer) => {
          const r = c.range ?? { start: 0 };
          const end = Math.min(r.end ?? s.length - 1, s.length - 1);
          c.res.writeHead(206, { 'content-range': `bytes ${r.start}-${end}/${s.length}`, 'content-length': String(end - r.start) });
          c.res.end(s.subarray(r.start, end));
        },
        expect: unavailable,
      },
      { name: 'range reads: 206 with a body cut short then a clean close', first: (c: HostileCtx, s: Buffer) => (c.res.writeHead(206, { 'content-range': `bytes ${c.range?.start ?? 0}-${c.range?.end ?? 0}/${s.length}` }), c.res.end(s.subarray(c.range?.start ?? 0, (c.range?.start ?? 0) + 10))), expect: unavailable },
      { name: 'range reads: 416 for a range inside the blob', first: (c: HostileCtx) => status(c, 416), expect: { class: ['InvalidArgument', 'Unavailable'] as ErrorClass[] } },
    ] as { name: string; first: (c: HostileCtx, s: Buffer) => unknown; once?: boolean; expect: Case['expect'] }[]
  ).map(
    (r): Case => ({
      name: r.name,
      stream: 'range',
      // The full GET sends its headers and then nothing; Range GETs get the case's behaviour.
      behaviour: (served) => {
        let ranged = 0;
        return (ctx) => (!ctx.range ? stallAfter(ctx, served, 0) : r.once && ++ranged > 1 ? serve(ctx, served) : r.first(ctx, served));
      },
      check: r.once ? (log) => expect(log.filter((l) => l.includes(' range=0-')).length).toBeGreaterThanOrEqual(2) : undefined,
      expect: r.expect,
    }),
  ),

  // --- the pool cap
  { name: 'a file larger than the pool cap: its reader gets the bytes, the pool keeps nothing', mode: 'large', stream: true, transient: true, cap: 512 * 1024, behaviour: always(serve), expect: 'ok' },
];

describe('registry fault corpus', () => {
  it(`has at least 40 distinct behaviours (${cases.length})`, () => {
    expect(cases.length).toBeGreaterThanOrEqual(40);
    expect(new Set(cases.map((c) => c.name)).size).toBe(cases.length);
  });

  for (const c of cases) {
    it(c.name, async () => {
      const endsAtDeadline = typeof c.expect === 'object' && ([] as ErrorClass[]).concat(c.expect.class).includes('DeadlineExceeded');
      const TIMEOUT = endsAtDeadline ? SHORT_TIMEOUT : LONG_TIMEOUT;
      await setup(TIMEOUT, { ...(c.cap ? { cap: c.cap } : {}), range: c.stream === 'range' });
      const refused = c.name.startsWith('registry down');
      const { req, served, want } = requestOf(c.mode ?? 'raw', refused ? `127.0.0.1:${deadPort}` : reg.host);
      reg.set(c.behaviour(served));
      let result: { ok: true; bytes: Buffer } | { ok: false; err: unknown };
      const started = Date.now();
      try {
        if (c.stream) {
          const f = fetcher.stream(req);
          try {
            // Range never serves the last byte (only the verified download does, and here it stalls).
            const bytes = await bounded(readAll(f, c.stream === 'range' ? req.size - 1 : req.size), TIMEOUT + MARGIN, c.name);
            result = { ok: true, bytes };
          } finally {
            await f.close();
          }
        } else {
          await bounded(fetcher.fetch(req), TIMEOUT + MARGIN, c.name);
          result = { ok: true, bytes: await fs.readFile(pool.path(req.digest)) };
        }
      } catch (err) {
        result = { ok: false, err };
      }
      const took = Date.now() - started;
      if (process.env.RF_DEBUG) console.log(c.name, reg.log, result.ok ? "ok" : String((result as { err: unknown }).err));
      // Let late socket errors surface before judging.
      await new Promise((r) => setTimeout(r, 50));
      expect(crashes.map((e) => (e as Error)?.stack ?? String(e)), 'uncaught exceptions / unhandled rejections').toEqual([]);
      expect(reg.errors).toEqual([]);
      expect(took).toBeLessThan(TIMEOUT + MARGIN);
      if (c.expect === 'either') {
        // Right bytes or a clear error; never wrong bytes in the pool.
        if (result.ok) expect(result.bytes.equals(c.stream === 'range' ? want.subarray(0, want.length - 1) : want)).toBe(true);
        else expect((result as { err: unknown }).err).toBeInstanceOf(GearError);
        await fetcher.close();
        if (pool.has(req.digest)) expect((await fs.readFile(pool.path(req.digest))).equals(want)).toBe(true);
      } else if (c.expect === 'ok') {
        if (!result.ok) throw result.err;
        expect(result.bytes.equals(c.stream === 'range' ? want.subarray(0, want.length - 1) : want), 'bytes served').toBe(true);
        if (c.transient) {
          await bounded(waitFor(() => fetcher.progress(req.digest) === undefined && !pool.has(req.digest)), LONG_TIMEOUT, 'eviction');
          expect(pool.has(req.digest)).toBe(false);
          expect(pool.stat().bytes).toBeLessThanOrEqual(pool.stat().capBytes);
        } else {
          if (c.stream === true) await bounded(waitFor(() => pool.has(req.digest)), LONG_TIMEOUT, 'pool commit');
          // Range-served bytes are not verified (format.md §4): the file enters the pool only through its full download.
          if (c.stream !== 'range') expect(pool.has(req.digest)).toBe(true);
        }
      } else {
        expect(result.ok, 'expected an error').toBe(false);
        const err = (result as { err: unknown }).err;
        expect(err, String(err)).toBeInstanceOf(GearError);
        const classes = Array.isArray(c.expect.class) ? c.expect.class : [c.expect.class];
        expect(classes, `${(err as GearError).class}: ${(err as Error).message}`).toContain((err as GearError).class);
        if (c.expect.message) expect((err as Error).message).toMatch(c.expect.message);
        expect((err as Error).message.length).toBeGreaterThan(20);
        // Nothing wrong enters the pool, and no staging file outlives the download.
        await fetcher.close();
        expect(pool.has(req.digest)).toBe(false);
        expect(await stagingFiles()).toEqual([]);
      }
      c.check?.(reg.log);
    });
  }
});

async function waitFor(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
}
