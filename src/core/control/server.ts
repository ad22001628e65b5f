/**
 * The daemon's local control endpoint: HTTP over a unix socket at
 * ROOT/gear-control.sock (socket-path.ts), mode 0600, owned by the daemon's
 * user (root): only root talks to it. `gear stats` reads GET /v1/stats;
 * `gear cache verify` POSTs /v1/cache/verify?rate=N, a long call answered as
 * JSON lines (`{"progress":…}` while it runs, then `{"result":…}` or
 * `{"error":…}`), cancelled when the client goes away.
 *
 * Bounded: no request body accepted (a Content-Length above 0 or a chunked
 * body is refused), 8 KiB of headers, 10 s to send the request, at most 16
 * connections. The socket is created under a temporary name, restricted, then
 * renamed into place, so it is never reachable with a wider mode.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import path from 'node:path';
import { describeError, errnoCode } from '../errors.js';
import type { Logger } from '../log.js';
import { CONTROL_SOCKET, socketPathIn } from './socket-path.js';

export type ControlRoutes = Record<string, () => Promise<unknown> | unknown>;
/** A POST call: gets the query, reports progress lines, resolves its result; `signal` aborts when the client is gone. */
export type ControlCall = (query: URLSearchParams, progress: (p: unknown) => void, signal: AbortSignal) => Promise<unknown>;
export type ControlCalls = Record<string, ControlCall>;

export interface ControlServer {
  /** The socket's real path. */
  readonly socket: string;
  close(): Promise<void>;
}

const MAX_CONNECTIONS = 16;

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = `${JSON.stringify(body)}\n`;
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
}

/** Answers a POST call with JSON lines: progress, then the result or the error. */
async function runCall(call: ControlCall, query: URLSearchParams, res: ServerResponse, url: string, logger?: Logger): Promise<void> {
  const controller = new AbortController();
  res.on('close', () => controller.abort(new Error('the client went away')));
  res.writeHead(200, { 'content-type': 'application/x-ndjson' });
  const line = (o: unknown) => {
    if (!res.writableEnded && !res.destroyed) res.write(`${JSON.stringify(o)}\n`);
  };
  try {
    line({ result: await call(query, (p) => line({ progress: p }), controller.signal) });
  } catch (err) {
    logger?.warn({ err: describeError(err), endpoint: url }, 'control: call failed');
    line({ error: describeError(err), class: (err as { class?: unknown }).class ?? 'Internal' });
  }
  res.end();
}

/** Serves `routes` (GET path → JSON answer) and `calls` (POST path → JSON lines) at dir/gear-control.sock. */
export async function serveControl(dir: string, routes: ControlRoutes, logger?: Logger, calls: ControlCalls = {}): Promise<ControlServer> {
  const handle = (req: IncomingMessage, res: ServerResponse) => {
    const [url = '', qs = ''] = (req.url ?? '').split('?');
    const route = Object.hasOwn(routes, url) ? routes[url] : undefined;
    const call = Object.hasOwn(calls, url) ? calls[url] : undefined;
    if (!route && !call) return send(res, 404, { error: `no such endpoint ${url.slice(0, 100)}; known: ${[...Object.keys(routes), ...Object.keys(calls)].join(', ')}` });
    const method = route ? 'GET' : 'POST';
    if (req.method !== method) return send(res, 405, { error: `only ${method}` });
    const length = Number(req.headers['content-length'] ?? 0);
    if (req.headers['transfer-encoding'] || !(length === 0)) return send(res, 413, { error: 'no request body accepted' });
    if (call) return void runCall(call, new URLSearchParams(qs.slice(0, 4096)), res, url, logger);
    Promise.resolve()
      .then(route)
      .then(
        (body) => send(res, 200, body),
        (err: unknown) => {
          logger?.warn({ err: describeError(err), endpoint: url }, 'control: request failed');
          send(res, 500, { error: describeError(err) });
        },
      );
  };
  const server: Server = createServer({ maxHeaderSize: 8192 }, handle);
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  server.maxHeadersCount = 32;
  server.maxConnections = MAX_CONNECTIONS;

  const real = path.join(path.resolve(dir), CONTROL_SOCKET);
  // A daemon killed between bind and rename left its temporary socket.
  for (const name of await fs.readdir(dir).catch(() => [] as string[])) {
    if (/^\.gear-control-[0-9a-f]{8}\.sock$/.test(name)) await fs.rm(path.join(dir, name), { force: true }).catch(() => undefined);
  }
  const tmpName = `.gear-control-${randomBytes(4).toString('hex')}.sock`;
  const tmp = socketPathIn(dir, tmpName);
  const final = socketPathIn(dir, CONTROL_SOCKET);
  let ino = 0;
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(tmp.path, () => {
        server.off('error', reject);
        resolve();
      });
    });
    await fs.chmod(tmp.path, 0o600);
    // Replaces the socket a previous (killed) daemon left behind.
    await fs.rename(tmp.path, final.path);
    ino = (await fs.stat(final.path)).ino;
  } catch (err) {
    server.close();
    await fs.rm(tmp.path, { force: true }).catch(() => undefined);
    throw err;
  } finally {
    tmp.release();
    final.release();
  }
  server.on('error', (err) => logger?.warn({ err: describeError(err) }, 'control server'));
  logger?.info({ socket: real }, 'control endpoint listening (gear stats)');
  let closing: Promise<void> | undefined;
  return {
    socket: real,
    close: () =>
      (closing ??= (async () => {
        server.closeAllConnections();
        await new Promise<void>((resolve) => server.close(() => resolve()));
        const p = socketPathIn(dir, CONTROL_SOCKET);
        try {
          // A daemon started on this root since then has replaced it: that one is not ours to remove.
          if ((await fs.stat(p.path)).ino === ino) await fs.unlink(p.path);
        } catch (err) {
          if (errnoCode(err) !== 'ENOENT') logger?.warn({ err: describeError(err) }, 'control: could not remove the socket');
        } finally {
          p.release();
        }
      })()),
  };
}
