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
