/**
 * The graph-driver plugin's HTTP edge: an express app on a unix socket.
 *
 * Transport only — routing, reading bodies (dockerd sends no Content-Type, so
 * no body-parser middleware applies: we read raw bytes), one log line per
 * request, and turning thrown errors into `{"Err": …}` through
 * `toWireError` (protocol.ts). The verbs themselves live in driver.ts.
 */
import { once } from 'node:events';
import { lstat, mkdir, unlink } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import express, { type Request, type Response } from 'express';
import type { Logger } from 'pino';
import {
  errnoCode,
  deadlineExceeded,
  errorClass,
  failedPrecondition,
  GearError,
  invalidArgument,
  unavailable,
} from '../../core/errors.js';
import { GraphDriver, type StoreOpener } from './driver.js';
import {
  ACTIVATE_REPLY,
  decodeDriverRequest,
  decodeInitRequest,
  type DriverRequest,
  type DriverResponse,
  parseApplyDiffQuery,
  parseBody,
  PLUGIN_MIMETYPE,
  toWireError,
} from './protocol.js';
import { openCoreLayerStore } from './store-opener.js';

/** JSON request bodies are tiny; anything bigger than this is not from dockerd. */
const MAX_JSON_BODY = 1 << 20;
/** Default of GraphDriverServerOptions.bodyIdleTimeoutMs. */
export const DEFAULT_BODY_IDLE_TIMEOUT_MS = 120_000;
/** A JSON body (at most MAX_JSON_BODY bytes) must be complete this long after its headers. */
const JSON_BODY_DEADLINE_MS = 60_000;

/** Transport limits of the app. */
export interface BodyLimits {
  /**
   * How long a request body may send nothing while we wait for it (the
   * ApplyDiff tar, a JSON body) before the call fails with DeadlineExceeded
   * and its connection is closed; time the store itself is not reading
   * (backpressure) does not count.
   */
  bodyIdleTimeoutMs: number;
}

/** What the request logger records about a call (set by handlers, read on finish). */
interface CallInfo {
  method: string;
  id?: string;
  err?: unknown;
}

/** A JSON verb: decoded body in, response object out. */
type JsonVerb = (driver: GraphDriver, body: Record<string, unknown>) => Promise<DriverResponse> | DriverResponse;

const layerReq = (body: Record<string, unknown>): DriverRequest => decodeDriverRequest(body);
const diffReq = (body: Record<string, unknown>): DriverRequest => decodeDriverRequest(body, { parent: true });

/** Every JSON endpoint, by method name after "/GraphDriver.". Diff and ApplyDiff stream and are routed apart. */
const JSON_VERBS: Record<string, JsonVerb> = {
  Init: (d, b) => d.init(decodeInitRequest(b)),
  Create: (d, b) => d.create(diffReq(b), 'ro'),
  CreateReadWrite: (d, b) => d.create(diffReq(b), 'rw'),
  Remove: (d, b) => d.remove(layerReq(b)),
  Get: (d, b) => d.get(layerReq(b)),
  Put: (d, b) => d.put(layerReq(b)),
  Exists: (d, b) => d.exists(layerReq(b)),
  Status: (d) => d.status(),
  GetMetadata: (d, b) => d.getMetadata(layerReq(b)),
  Cleanup: (d) => d.cleanup(),
  Changes: (d, b) => d.changes(diffReq(b)),
  DiffSize: (d, b) => d.diffSize(diffReq(b)),
  Capabilities: (d) => d.capabilities(),
};

/**
 * Reads a whole (small) request body. Past `limit` bytes it keeps reading but
 * discards, then fails: breaking off (or destroying the request) would cut
 * the connection, and dockerd would never see the `Err`.
 */
function readBody(req: Request, limit: number, limits: BodyLimits): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const idle = idleTimer(req, limits, 'the JSON request body', (err) => finish(err));
    const deadline = setTimeout(
      () => finish(deadlineExceeded(`the JSON request body was not complete ${JSON_BODY_DEADLINE_MS / 1000} s after its headers (at most ${limit} bytes are accepted)`)),
      JSON_BODY_DEADLINE_MS,
    );
    const finish = (err: Error | undefined, body?: Buffer): void => {
      idle.stop();
      clearTimeout(deadline);
      if (err) reject(err);
      else resolve(body!);
    };
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size <= limit) chunks.push(chunk);
    });
    req.once('end', () => {
      if (size > limit) finish(invalidArgument(`request body of ${size} bytes is larger than ${limit} bytes`));
      else finish(undefined, Buffer.concat(chunks));
    });
    req.once('error', (err) => finish(unavailable('reading the request body', err)));
    req.once('close', () => {
      if (!req.readableEnded) finish(unavailable('client went away before the end of the request body'));
    });
  });
}

/** Marks a request whose body timed out: its error reply is followed by closing the connection (the rest never comes). */
const TIMED_OUT = Symbol('body timed out');

/**
 * Fails (via onIdle) when req has sent no bytes for limits.bodyIdleTimeoutMs
 * while we were reading it; a paused req (backpressure: the store is busy)
 * is not idle.
 */
function idleTimer(req: Request, limits: BodyLimits, what: string, onIdle: (err: Error) => void): { stop(): void } {
  const ms = limits.bodyIdleTimeoutMs;
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      if (req.readableEnded) return;
      if (req.readableFlowing === false || req.isPaused()) return arm(); // we are not reading: not the client's fault
      const err = deadlineExceeded(
        `${what}: the client sent nothing for ${ms / 1000} s (the body idle timeout: gear daemon --body-idle-timeout, GEAR_BODY_IDLE_TIMEOUT)`,
      );
      (req as unknown as Record<symbol, boolean>)[TIMED_OUT] = true;
      stop();
      onIdle(err);
    }, ms);
  };
  const onData = (): void => arm();
  const stop = (): void => {
    clearTimeout(timer);
    req.off('data', onData);
  };
  if (ms > 0) {
    req.on('data', onData);
    arm();
  }
  return { stop };
}

/** Lets the rest of a request body flow away (after an early reply), so the connection stays usable. */
function drain(req: Request): Promise<void> {
  if (req.readableEnded || req.destroyed) return Promise.resolve();
  req.resume();
  return new Promise((resolve) => {
    req.once('end', resolve);
    req.once('close', resolve);
    req.once('error', resolve);
  });
}

/**
 * The request body as a stream the store may consume, or destroy, freely.
 * Destroying the IncomingMessage itself would destroy the socket, and dockerd
 * would see a transport error instead of our `Err` reply. Backpressure is kept
 * (pipe), and a client that goes away mid-body fails the store's read.
 */
function detachBody(req: Request, res: Response, limits: BodyLimits): { body: PassThrough; detach(): void } {
  const body = new PassThrough();
  const onGone = (): void => {
    if (!req.readableEnded) body.destroy(unavailable('client went away before the end of the layer tar'));
  };
  req.once('close', onGone);
  req.once('error', onGone);
  // Answered or cut before the tar was read (e.g. a framing error answered by the clientError handler): stop reading.
  res.once('close', onGone);
  const idle = idleTimer(req, limits, 'ApplyDiff: the layer tar', (err) => body.destroy(err));
  req.once('end', () => idle.stop());
  req.pipe(body);
  return {
    body,
    detach: () => {
      idle.stop();
      req.unpipe(body);
      req.off('close', onGone);
      req.off('error', onGone);
      res.off('close', onGone);
    },
  };
}

/** Resolves when stream has data (or ended); rejects if it fails first. */
function firstByte(stream: Readable): Promise<void> {
  if (stream.errored) return Promise.reject(stream.errored);
  if (stream.readableLength > 0 || stream.readableEnded) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (err?: Error): void => {
      stream.off('readable', onReadable);
      stream.off('end', onReadable);
      stream.off('error', done);
      stream.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onReadable = (): void => done();
    const onClose = (): void => done(stream.errored ?? unavailable('the layer tar stream closed before its first byte'));
    stream.once('readable', onReadable);
    stream.once('end', onReadable);
    stream.once('error', done);
    stream.once('close', onClose);
  });
}

function sendJson(res: Response, body: object, status = 200): void {
  if (res.writableEnded) return; // already answered (e.g. a malformed request, by the clientError handler)
  const text = JSON.stringify(body);
  res.status(status);
  res.setHeader('Content-Type', PLUGIN_MIMETYPE);
  res.setHeader('Content-Length', Buffer.byteLength(text));
  res.end(text);
}

/**
 * Replies `{"Err": …}` for a failed call. HTTP 200 is the protocol's error
 * convention, except where the success body is not JSON (Diff): there dockerd
 * only looks for `Err` on a non-200 reply.
 */
function sendError(res: Response, info: CallInfo, err: unknown, status = 200): void {
  info.err = err;
  if (res.writableEnded) return;
  if (res.headersSent) {
    // Mid-stream failure: cut the connection so dockerd sees a truncated body, never a clean end.
    res.destroy(err instanceof Error ? err : undefined);
    return;
  }
  if ((res.req as unknown as Record<symbol, unknown>)[TIMED_OUT] === true) {
    // The rest of the body is not coming: reply, then close (FIN; cut after 1 s if the client keeps it open).
    res.setHeader('Connection', 'close');
    res.once('finish', () => {
      const sock = res.req.socket;
      sock.end();
      setTimeout(() => sock.destroy(), 1000).unref();
    });
  }
  sendJson(res, { Err: toWireError(err) }, status);
}

/** Builds the express app serving /Plugin.Activate and /GraphDriver.* for one driver. */
export function createGraphDriverApp(
  driver: GraphDriver,
  logger: Logger,
  limits: BodyLimits = { bodyIdleTimeoutMs: DEFAULT_BODY_IDLE_TIMEOUT_MS },
): express.Express {
  const app = express();
  app.disable('x-powered-by');
  app.disable('etag');
  app.set('query parser', false); // ApplyDiff's query is unescaped; protocol.ts parses it.

  // One log line per request: debug on success, warn/error on failure.
  app.use((req, res, next) => {
    const start = process.hrtime.bigint();
    const info: CallInfo = { method: req.path.replace(/^\//, '') };
    res.locals.call = info;
    res.once('close', () => {
      const durationMs = Number(process.hrtime.bigint() - start) / 1e6;
      const fields: Record<string, unknown> = { method: info.method, durationMs: Math.round(durationMs * 10) / 10 };
      if (info.id) fields.id = info.id;
      if (!res.writableFinished && info.err === undefined) fields.aborted = true;
      if (info.err === undefined) {
        logger.debug(fields, 'request');
        return;
      }
      const cls = errorClass(info.err);
      fields.err = toWireError(info.err);
      if (cls === 'Internal' && !(info.err instanceof GearError)) fields.stack = (info.err as Error)?.stack;
      const clientSide = ['NotFound', 'AlreadyExists', 'InvalidArgument', 'FailedPrecondition'].includes(cls);
      if (clientSide) logger.warn(fields, 'request failed');
      else logger.error(fields, 'request failed');
    });
    next();
  });

  app.post('/Plugin.Activate', async (req, res) => {
    try {
      await readBody(req, MAX_JSON_BODY, limits); // the body is JSON `null`; read (bounded) and ignored
      sendJson(res, ACTIVATE_REPLY);
    } catch (err) {
      sendError(res, res.locals.call as CallInfo, err);
      void drain(req);
    }
  });

  for (const [name, verb] of Object.entries(JSON_VERBS)) {
    app.post(`/GraphDriver.${name}`, async (req, res) => {
      const info = res.locals.call as CallInfo;
      try {
        const body = parseBody(await readBody(req, MAX_JSON_BODY, limits));
        if (typeof body.ID === 'string') info.id = body.ID;
        sendJson(res, await verb(driver, body));
      } catch (err) {
        sendError(res, info, err);
        void drain(req);
      }
    });
  }

  // Diff: JSON request, raw tar reply, streamed (layers can be gigabytes).
  app.post('/GraphDriver.Diff', async (req, res) => {
    const info = res.locals.call as CallInfo;
    try {
      const body = parseBody(await readBody(req, MAX_JSON_BODY, limits));
      if (typeof body.ID === 'string') info.id = body.ID;
      const tar = await driver.diff(diffReq(body));
      // Until its first byte the tar may still fail as a proper `{"Err"}` reply; after it, only by a cut.
      await firstByte(tar);
      res.status(200);
      res.setHeader('Content-Type', 'application/x-tar');
      await pipeline(tar, res);
    } catch (err) {
      sendError(res, info, err, 500);
    }
  });

  // ApplyDiff: raw tar request body, handed to the store as a stream.
  app.post('/GraphDriver.ApplyDiff', async (req, res) => {
    const info = res.locals.call as CallInfo;
    try {
      const { id, parent } = parseApplyDiffQuery(req.originalUrl);
      info.id = id;
      const { body, detach } = detachBody(req, res, limits);
      let reply: DriverResponse;
      try {
        reply = await driver.applyDiff(id, parent, body);
      } finally {
        detach();
      }
      // dockerd digests the stream it sends; let trailing bytes (tar padding) arrive before replying.
      await drain(req);
      sendJson(res, reply);
    } catch (err) {
      sendError(res, info, err);
      void drain(req);
    }
  });

  app.use((req, res) => {
    const info = res.locals.call as CallInfo;
    sendError(res, info, new GearError('Unimplemented', `${req.method} ${req.path}: no such plugin method`), 404);
    void drain(req);
  });

  // Last resort (express calls this for errors thrown outside our try blocks).
  app.use((err: unknown, _req: Request, res: Response, _next: express.NextFunction) => {
    sendError(res, (res.locals.call as CallInfo | undefined) ?? { method: 'unknown' }, err);
  });

  return app;
}

export interface GraphDriverServerOptions {
  /** Unix socket path to listen on. Its directory is created; a stale socket file is replaced. */
  socket: string;
  /** Store root (--root); default: the Home that Init sends. */
  root?: string;
  logger: Logger;
  /** How the store is opened; default: the core's openLayerStore. Tests pass a fake. */
  openStore?: StoreOpener;
  /** Passed through to openStore (e.g. `{ lazy: {...} }` for the core store). */
  storeOptions?: Record<string, unknown>;
  /** How long close() waits for in-flight requests before cutting connections; default 10 s. */
  shutdownTimeoutMs?: number;
  /** See BodyLimits.bodyIdleTimeoutMs; default DEFAULT_BODY_IDLE_TIMEOUT_MS (120 s); 0 turns it off. */
  bodyIdleTimeoutMs?: number;
}

export interface GraphDriverServer {
  readonly socket: string;
  /**
   * Stops accepting, waits (bounded) for in-flight requests, removes the socket.
   * Does not unmount layers: running containers use them (dockerd calls Cleanup itself).
   * Idempotent.
   */
  close(): Promise<void>;
}

/** Starts the plugin server. Rejects (FailedPrecondition) if another process serves the socket. */
export async function startGraphDriverServer(opts: GraphDriverServerOptions): Promise<GraphDriverServer> {
  const logger = opts.logger;
  const socket = path.resolve(opts.socket);
  const driver = new GraphDriver({
    ...(opts.root !== undefined ? { root: opts.root } : {}),
    logger,
    openStore: opts.openStore ?? openCoreLayerStore,
    ...(opts.storeOptions ? { storeOptions: opts.storeOptions } : {}),
  });
  const app = createGraphDriverApp(driver, logger, { bodyIdleTimeoutMs: opts.bodyIdleTimeoutMs ?? DEFAULT_BODY_IDLE_TIMEOUT_MS });
  const server = http.createServer(app);
  // Node's defaults would abort a multi-minute ApplyDiff upload (requestTimeout 300 s).
  server.requestTimeout = 0;
  server.headersTimeout = 60_000;
  // dockerd keeps idle connections without a timeout of its own; a POST sent just as we close an
  // idle one fails on its side, so close idle connections rarely (Node's default is 5 s).
  server.keepAliveTimeout = 120_000;

  let inFlight = 0;
  let idle: (() => void) | undefined;
  server.on('request', (_req: http.IncomingMessage, res: http.ServerResponse) => {
    inFlight++;
    res.once('close', () => {
      inFlight--;
      if (inFlight === 0) idle?.();
    });
  });
  server.on('clientError', (err: NodeJS.ErrnoException, sock) => {
    // No one left to answer: our own cut (a Diff failing mid-stream, logged by its request), or a client that went away.
    if (err instanceof GearError || err.code === 'ECONNRESET' || err.code === 'HPE_INVALID_EOF_STATE' || !sock.writable || sock.readableEnded) {
      sock.destroy();
      return;
    }
    logger.warn({ err: String(err), code: err.code }, 'malformed HTTP request');
    replyMalformed(err, sock);
  });

  await prepareSocket(socket);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socket, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => logger.error({ err: String(err) }, 'server error'));
  logger.info({ socket, root: opts.root ?? '(from Init)' }, 'listening');
  void driver.openEagerly();

  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      const closed = once(server, 'close');
      server.close();
      server.closeIdleConnections();
      if (inFlight > 0) {
        logger.info({ inFlight }, 'waiting for in-flight requests');
        const timeoutMs = opts.shutdownTimeoutMs ?? 10_000;
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          new Promise<void>((resolve) => (idle = resolve)),
          new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs))),
        ]);
        clearTimeout(timer);
        if (inFlight > 0) logger.warn({ inFlight }, 'shutdown timeout; closing connections');
      }
      server.closeAllConnections();
      await closed;
      // The store's lazy machinery (miss filesystem, pool); layer mounts stay.
      await driver.close().catch((err: unknown) => logger.warn({ err: String(err) }, 'closing the store'));
      await unlink(socket).catch((err: unknown) => {
        if (errnoCode(err) !== 'ENOENT') logger.warn({ socket, err: String(err) }, 'could not remove socket');
      });
      logger.info({ socket }, 'stopped');
    })();
    return closing;
  };

  return { socket, close };
}

/**
 * Answers a request Node's HTTP parser refused (bad framing, headers too
 * large, …) with an `Err` reply instead of a bare cut, then closes the
 * connection. A request whose handler already runs is answered through its
 * response (which its handler then leaves alone); one whose reply started
 * can only be cut.
 */
function replyMalformed(err: NodeJS.ErrnoException, sock: import('node:stream').Duplex): void {
  const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400;
  const text = JSON.stringify({ Err: `InvalidArgument: malformed HTTP request: ${err.message}${err.code ? ` (${err.code})` : ''}` });
  const headers = { 'Content-Type': PLUGIN_MIMETYPE, 'Content-Length': String(Buffer.byteLength(text)), Connection: 'close' };
  const res = (sock as unknown as { _httpMessage?: http.ServerResponse })._httpMessage;
  setTimeout(() => sock.destroy(), 1000).unref();
  if (res) {
    // Its handler waits for a body that will never parse: closing the connection after the reply ends its wait.
    if (res.headersSent) sock.destroy();
    else res.writeHead(status, headers).end(text, () => sock.destroy());
    return;
  }
  const head = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('');
  sock.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\n${head}\r\n${text}`);
}

/**
 * Makes the socket path usable: creates its directory and removes a stale
 * socket file left by a crashed daemon — but only when nothing answers on it.
 */
async function prepareSocket(socket: string): Promise<void> {
  await mkdir(path.dirname(socket), { recursive: true });
  let st;
  try {
    st = await lstat(socket);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return;
    throw err;
  }
  if (!st.isSocket()) throw failedPrecondition(`socket ${socket}: the path exists and is not a socket; not removing it`);
  if (await answers(socket)) {
    throw failedPrecondition(`socket ${socket}: another process is listening on it (is a gear daemon already running?)`);
  }
  await unlink(socket);
}

/** True if something accepts connections on the unix socket. */
function answers(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const conn = net.connect(socket);
    const done = (alive: boolean) => {
      conn.destroy();
      resolve(alive);
    };
    conn.setTimeout(2000, () => done(true)); // a hung listener is still a listener
    conn.once('connect', () => done(true));
    conn.once('error', () => done(false));
  });
}
