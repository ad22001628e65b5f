/**
 * Client of the control endpoint (server.ts): GET a path from the daemon
 * serving a Gear root, answer parsed as JSON. Bounded: 30 s, 64 MiB.
 */
import { request } from 'node:http';
import { failedPrecondition, unavailable } from '../errors.js';
import { socketPathIn } from './socket-path.js';

const MAX_ANSWER = 64 * 1024 * 1024;

export async function controlGet<T>(root: string, endpoint: string, timeoutMs = 30_000): Promise<T> {
  const sock = socketPathIn(root);
  try {
    return await new Promise<T>((resolve, reject) => {
      const req = request({ socketPath: sock.path, path: endpoint, method: 'GET', timeout: timeoutMs }, (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_ANSWER) req.destroy(unavailable(`the daemon's answer to ${endpoint} exceeds ${MAX_ANSWER} bytes`));
          else chunks.push(c);
        });
        res.on('error', reject);
        res.on('end', () => {
          let body: unknown;
          try {
            body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
          } catch {
            return reject(unavailable(`the daemon's answer to ${endpoint} is not JSON`));
          }
          if (res.statusCode !== 200) {
            const msg = (body as { error?: unknown })?.error;
            return reject(unavailable(`the daemon answered ${res.statusCode} to ${endpoint}: ${typeof msg === 'string' ? msg : 'no reason given'}`));
          }
          resolve(body as T);
        });
      });
      req.on('timeout', () => req.destroy(unavailable(`the daemon did not answer ${endpoint} within ${timeoutMs / 1000} s`)));
      req.on('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
          reject(
            failedPrecondition(
              `no Gear daemon is serving ${root}: ${sock.real} ${err.code === 'ENOENT' ? 'does not exist' : 'refuses connections'} ` +
                '(start `gear daemon` or `gear snapshotter` with this root, or pass the root it uses with --root)',
            ),
          );
        } else if (err.code === 'EACCES') reject(failedPrecondition(`${sock.real}: permission denied (the control socket is root's: run as root)`));
        else reject(err);
      });
      req.end();
    });
  } finally {
    sock.release();
  }
}

/**
 * POSTs a call of the control endpoint and reads its JSON lines: each
 * `{"progress":…}` goes to onProgress, `{"result":…}` resolves, `{"error":…}`
 * rejects (with the daemon's words). No overall timeout (a scrub may take
 * hours); a line longer than 1 MiB or silence for `idleMs` fails it.
 */
export async function controlCall<T>(root: string, endpoint: string, query: Record<string, string>, onProgress?: (p: unknown) => void, idleMs = 120_000): Promise<T> {
  const sock = socketPathIn(root);
  const qs = new URLSearchParams(query).toString();
  try {
    return await new Promise<T>((resolve, reject) => {
      let settled = false;
      const finish = (err: unknown, value?: T) => {
        if (settled) return;
        settled = true;
        if (err) reject(err);
        else resolve(value as T);
        req.destroy();
      };
      const req = request({ socketPath: sock.path, path: qs ? `${endpoint}?${qs}` : endpoint, method: 'POST', timeout: idleMs, headers: { 'content-length': 0 } }, (res) => {
        if (res.statusCode !== 200) {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (text = (text + c).slice(0, 65536)));
          res.on('end', () => {
            let msg = text.trim();
            try {
              msg = String((JSON.parse(text) as { error?: unknown }).error ?? msg);
            } catch {
              // not JSON: the text itself
            }
            finish(unavailable(`the daemon answered ${res.statusCode} to ${endpoint}: ${msg}`));
          });
          return;
        }
        let buf = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => {
          buf += c;
          if (buf.length > 1024 * 1024) return finish(unavailable(`the daemon's answer to ${endpoint} has a line over 1 MiB`));
          for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
            const text = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            let o: { progress?: unknown; result?: T; error?: unknown };
            try {
              o = JSON.parse(text) as typeof o;
            } catch {
              return finish(unavailable(`the daemon's answer to ${endpoint} is not JSON lines`));
            }
            if ('progress' in o) onProgress?.(o.progress);
            else if ('result' in o) return finish(undefined, o.result as T);
            else return finish(unavailable(`the daemon: ${String(o.error ?? 'failed without a reason')}`));
          }
        });
        res.on('end', () => finish(unavailable(`the daemon ended ${endpoint} without a result (did it stop?)`)));
        res.on('error', (err) => finish(err));
      });
      req.on('timeout', () => finish(unavailable(`the daemon sent nothing on ${endpoint} for ${idleMs / 1000} s`)));
      req.on('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
          finish(failedPrecondition(`no Gear daemon is serving ${root}: ${sock.real} ${err.code === 'ENOENT' ? 'does not exist' : 'refuses connections'}`));
        } else if (err.code === 'EACCES') finish(failedPrecondition(`${sock.real}: permission denied (the control socket is root's: run as root)`));
        else finish(err);
      });
      req.end();
    });
  } finally {
    sock.release();
  }
}
