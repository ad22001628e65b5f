/**
 * A hostile OCI registry on 127.0.0.1 for fault tests: a node:http server
 * whose every answer comes from the case's `Behaviour`. Building blocks for
 * behaviours are below (`serve`, `resetAfter`, `trickle`, …): each takes the
 * blob's bytes and answers one request, honouring Range like a registry.
 *
 * ```ts
 * const reg = await startHostileRegistry();
 * reg.set((ctx) => (ctx.n === 1 ? resetAfter(ctx, content, 100) : serve(ctx, content)));
 * // use reg.host as the registry; reg.log = request lines; await reg.stop()
 * ```
 * Sockets are tracked and destroyed by stop() and by set() (a case never
 * leaks a trickling connection into the next).
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

export interface HostileCtx {
  req: IncomingMessage;
  res: ServerResponse;
  /** Request number within the current behaviour (1-based), token requests included. */
  n: number;
  /** Blob GET number within the current behaviour (1-based; 0 for other requests). */
  blobN: number;
  /** The parsed Range header, if any. */
  range: { start: number; end?: number } | undefined;
  /** Bearer token the request carried, if any. */
  token: string | undefined;
}

export type Behaviour = (ctx: HostileCtx) => unknown;

export interface HostileRegistry {
  host: string;
  port: number;
  /** Request lines seen for the current behaviour ("GET /v2/…", with " range=a-b" when ranged). */
  readonly log: string[];
  /** Replace the behaviour (resets counters and the log; drops open connections unless keepConnections). */
  set(b: Behaviour, opts?: { keepConnections?: boolean }): void;
  /** Errors thrown by behaviours (a test bug, not a client bug). */
  readonly errors: unknown[];
  stop(): Promise<void>;
}

export async function startHostileRegistry(): Promise<HostileRegistry> {
  let behaviour: Behaviour = ({ res }) => {
    res.writeHead(404).end();
  };
  let n = 0;
  let blobN = 0;
  const log: string[] = [];
  const errors: unknown[] = [];
  const sockets = new Set<Socket>();
  const server = createServer((req, res) => {
    n++;
    const isBlob = req.method === 'GET' && !!req.url?.includes('/blobs/sha256:');
    if (isBlob) blobN++;
    const m = /^bytes=([0-9]+)-([0-9]*)$/.exec(String(req.headers.range ?? ''));
    const range = m ? { start: Number(m[1]), ...(m[2] ? { end: Number(m[2]) } : {}) } : undefined;
    const auth = String(req.headers.authorization ?? '');
    if (log.length < 10_000) log.push(`${req.method} ${req.url}${range ? ` range=${range.start}-${range.end ?? ''}` : ''}`);
    const ctx: HostileCtx = { req, res, n, blobN: isBlob ? blobN : 0, range, token: auth.startsWith('Bearer ') ? auth.slice(7) : undefined };
    req.resume();
    Promise.resolve()
      .then(() => behaviour(ctx))
      .catch((err: unknown) => {
        errors.push(err);
        res.destroy();
      });
  });
  server.keepAliveTimeout = 60_000;
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => undefined);
  });
  server.on('clientError', (_err, s) => s.destroy());
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    host: `127.0.0.1:${port}`,
    port,
    log,
    errors,
    set(b, opts) {
      if (!opts?.keepConnections) for (const s of sockets) s.destroy();
      behaviour = b;
      n = 0;
      blobN = 0;
      log.length = 0;
    },
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

// ------------------------------------------------------------------ building blocks

/** The slice of content a request asks for, and the status/headers a registry would answer with. */
export function rangeOf(ctx: HostileCtx, content: Buffer): { status: number; body: Buffer; headers: Record<string, string> } {
  const r = ctx.range;
  if (r && r.start < content.length) {
    const end = Math.min(r.end ?? content.length - 1, content.length - 1);
    return {
      status: 206,
      body: content.subarray(r.start, end + 1),
      headers: { 'content-range': `bytes ${r.start}-${end}/${content.length}`, 'content-length': String(end - r.start + 1) },
    };
  }
  return { status: 200, body: content, headers: { 'content-length': String(content.length) } };
}

/** A healthy registry answer (Range honoured). */
export function serve(ctx: HostileCtx, content: Buffer, extra: Record<string, string> = {}): void {
  const { status, body, headers } = rangeOf(ctx, content);
  ctx.res.writeHead(status, { 'content-type': 'application/octet-stream', ...headers, ...extra });
  ctx.res.end(body);
}

/** Headers and the first `bytes` of the (ranged) body, then a TCP reset. */
export function resetAfter(ctx: HostileCtx, content: Buffer, bytes: number): void {
  const { status, body, headers } = rangeOf(ctx, content);
  ctx.res.writeHead(status, { 'content-type': 'application/octet-stream', ...headers });
  ctx.res.flushHeaders();
  const part = body.subarray(0, Math.max(0, Math.min(bytes, body.length)));
  const kill = () => setTimeout(() => ctx.req.socket.resetAndDestroy(), 20).unref();
  if (part.length > 0) ctx.res.write(part, kill);
  else kill();
}

/** Headers and the first `bytes` of the body, and a TCP reset right behind them (no pause): the reset lands while the client is still setting up its consumer. */
export function resetNow(ctx: HostileCtx, content: Buffer, bytes: number): void {
  const { status, body, headers } = rangeOf(ctx, content);
  ctx.res.writeHead(status, { 'content-type': 'application/octet-stream', ...headers });
  ctx.res.flushHeaders();
  if (bytes > 0) ctx.res.write(body.subarray(0, bytes));
  setImmediate(() => ctx.req.socket.resetAndDestroy());
}

/** Headers and `fraction` of this answer's (ranged) body, then a TCP reset: every answer makes some progress, none completes. */
export function resetFraction(ctx: HostileCtx, content: Buffer, fraction: number): void {
  const { body } = rangeOf(ctx, content);
  resetAfter(ctx, content, Math.floor(body.length * fraction));
}

/** Resets the connection once the whole blob's absolute offset `at` is reached (ranged requests included). */
export function resetAtOffset(ctx: HostileCtx, content: Buffer, at: number): void {
  const start = ctx.range?.start ?? 0;
  if (at <= start) return serve(ctx, content);
  resetAfter(ctx, content, at - start);
}

/** Sends `bytes` bytes every `everyMs`, forever (until the client goes away). */
export function trickle(ctx: HostileCtx, content: Buffer, bytes: number, everyMs: number, extra: Record<string, string> = {}): void {
  const { status, body, headers } = rangeOf(ctx, content);
  ctx.res.writeHead(status, { 'content-type': 'application/octet-stream', ...headers, ...extra });
  ctx.res.flushHeaders();
  let off = 0;
  const timer = setInterval(() => {
    if (ctx.res.destroyed || off >= body.length) {
      clearInterval(timer);
      if (!ctx.res.destroyed) ctx.res.end();
      return;
    }
    ctx.res.write(body.subarray(off, off + bytes));
    off += bytes;
  }, everyMs);
  timer.unref();
  ctx.res.on('close', () => clearInterval(timer));
}

/** Sends the first `bytes` of the body and then nothing, keeping the connection open. */
export function stallAfter(ctx: HostileCtx, content: Buffer, bytes: number): void {
  const { status, body, headers } = rangeOf(ctx, content);
  ctx.res.writeHead(status, { 'content-type': 'application/octet-stream', ...headers });
  ctx.res.flushHeaders();
  if (bytes > 0) ctx.res.write(body.subarray(0, bytes));
}

/** A registry error answer with a JSON error body. */
export function status(ctx: HostileCtx, code: number, headers: Record<string, string> = {}, body = '{"errors":[{"code":"UNAVAILABLE","message":"hostile"}]}'): void {
  ctx.res.writeHead(code, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), ...headers });
  ctx.res.end(body);
}

/** Raw bytes on the socket instead of an HTTP answer, then close. */
export function raw(ctx: HostileCtx, bytes: string | Buffer, reset = false): void {
  const s = ctx.req.socket;
  s.write(bytes, () => (reset ? s.resetAndDestroy() : s.end()));
}
