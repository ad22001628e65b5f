/**
 * A fault-injecting HTTP proxy on 127.0.0.1 for registry tests. It forwards
 * every request to `target` (keeping the Host header, so the registry's
 * Location URLs point back at the proxy) unless `decide` returns a fault:
 *
 * - `{ kind: 'status', status, headers? }` answer at once (e.g. 503, 429 + Retry-After)
 * - `{ kind: 'reset' }`   tear the connection down with a TCP RST, no response
 * - `{ kind: 'flip' }`    forward, but flip the bits of one body byte
 * - `{ kind: 'truncate', bytes }` forward headers and the first `bytes` of the body, then reset
 * - `{ kind: 'hang' }`    accept and never answer (until stop())
 * - `{ kind: 'delay', ms }` forward, `ms` late (a slow first byte)
 * - `{ kind: 'throttle', bytesPerSecond, flipAt? }` forward the body at that rate (a
 *   slow link); with `flipAt`, flip the bits of the body byte at that offset
 *
 * ```ts
 * const proxy = await startFaultProxy(reg.url, (req, n) => (n <= 2 ? { kind: 'status', status: 503 } : undefined));
 * // use proxy.host instead of reg.host; proxy.count = requests seen; await proxy.stop()
 * ```
 */
import { createServer, request as httpRequest, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

export type FaultAction =
  | { kind: 'forward' }
  | { kind: 'status'; status: number; headers?: Record<string, string>; body?: string }
  | { kind: 'reset' }
  | { kind: 'flip' }
  | { kind: 'truncate'; bytes: number }
  | { kind: 'hang' }
  | { kind: 'delay'; ms: number }
  | { kind: 'throttle'; bytesPerSecond: number; flipAt?: number };

/** Decide what to do with request number `n` (1-based). Undefined = forward. */
export type FaultDecider = (req: IncomingMessage, n: number) => FaultAction | undefined;

export interface FaultProxy {
  host: string;
  url: string;
  /** Requests seen so far. */
  readonly count: number;
  /** Request lines seen ("GET /v2/…"), capped at 10,000. */
  readonly seen: string[];
  /** Replace the decider. */
  setDecider(d: FaultDecider): void;
  stop(): Promise<void>;
}

export async function startFaultProxy(target: string, decide: FaultDecider = () => undefined): Promise<FaultProxy> {
  const t = new URL(target);
  let decider = decide;
  let count = 0;
  const seen: string[] = [];
  const sockets = new Set<Socket>();

  const forward = (req: IncomingMessage, res: ServerResponse, action: FaultAction | undefined) => {
    const up = httpRequest(
      { host: t.hostname, port: t.port, method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        res.on('close', () => {
          if (!res.writableFinished) upRes.destroy(); // the client went away
        });
        let sent = 0;
        let flipped = false;
        const started = Date.now();
        upRes.on('data', (chunk: Buffer) => {
          if (action?.kind === 'throttle') {
            let c = chunk;
            const at = action.flipAt;
            if (at !== undefined && at >= sent && at < sent + c.length) {
              c = Buffer.from(chunk);
              c[at - sent] = c[at - sent]! ^ 0xff;
            }
            sent += c.length;
            res.write(c);
            const wait = started + (sent / action.bytesPerSecond) * 1000 - Date.now();
            if (wait > 0) {
              upRes.pause();
              setTimeout(() => upRes.resume(), wait).unref();
            }
            return;
          }
          if (action?.kind === 'flip' && !flipped && chunk.length > 0) {
            const c = Buffer.from(chunk);
            const i = Math.floor(c.length / 2);
            c[i] = c[i]! ^ 0xff;
            flipped = true;
            res.write(c);
            return;
          }
          if (action?.kind === 'truncate') {
            const room = action.bytes - sent;
            if (room > 0) res.write(chunk.subarray(0, room));
            sent += chunk.length;
            if (sent >= action.bytes) {
              upRes.destroy();
              req.socket.resetAndDestroy();
            }
            return;
          }
          res.write(chunk);
        });
        upRes.on('end', () => res.end());
        upRes.on('error', () => res.destroy());
      },
    );
    up.on('error', () => res.destroy());
    req.pipe(up);
  };

  const server = createServer((req, res) => {
    count++;
    if (seen.length < 10_000) seen.push(`${req.method} ${req.url}`);
    const action = decider(req, count);
    switch (action?.kind) {
      case 'status':
        req.resume();
        req.on('end', () => {
          res.writeHead(action.status, { 'content-type': 'application/json', ...(action.headers ?? {}) });
          res.end(action.body ?? '{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}');
        });
        return;
      case 'reset':
        req.socket.resetAndDestroy();
        return;
      case 'hang':
        req.resume();
        return;
      case 'delay':
        setTimeout(() => forward(req, res, undefined), action.ms);
        return;
      default:
        forward(req, res, action);
    }
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    host: `127.0.0.1:${port}`,
    url: `http://127.0.0.1:${port}`,
    get count() {
      return count;
    },
    seen,
    setDecider(d) {
      decider = d;
    },
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
