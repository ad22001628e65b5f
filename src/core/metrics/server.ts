/**
 * The /metrics endpoint: Prometheus text from a prom-client registry on
 * HOST:PORT (`--metrics-address`, GEAR_METRICS_ADDRESS). GET or HEAD of
 * /metrics only; no request body is read; the socket belongs to the daemon and
 * closes with it.
 */
import { createServer, type Server } from 'node:http';
import type { Registry } from 'prom-client';
import { describeError, invalidArgument } from '../errors.js';
import type { Logger } from '../log.js';

export interface MetricsServer {
  /** Where it listens, as HOST:PORT (the port the kernel chose for :0). */
  readonly address: string;
  close(): Promise<void>;
}

/** "HOST:PORT", "[v6]:PORT" or ":PORT" (all interfaces); PORT 0 lets the kernel choose. */
export function parseMetricsAddress(text: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s[\]]*)):(\d{1,5})$/.exec(text.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) {
    throw invalidArgument(`metrics address ${JSON.stringify(text)}: expected HOST:PORT, e.g. 127.0.0.1:9495 or :9495 (all interfaces)`);
  }
  return { host: m[1] ?? (m[2] || '0.0.0.0'), port };
}

export async function serveMetrics(address: string, registry: Registry, logger?: Logger): Promise<MetricsServer> {
  const { host, port } = parseMetricsAddress(address);
  const server: Server = createServer((req, res) => {
    const url = (req.url ?? '').split('?')[0];
    if (url !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: metrics are at /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
      (err: unknown) => {
        logger?.warn({ err: describeError(err) }, 'metrics: collecting failed');
        res.writeHead(500, { 'content-type': 'text/plain' }).end('collecting metrics failed\n');
      },
    );
  });
  server.requestTimeout = 10_000;
  server.headersTimeout = 5_000;
  server.maxHeadersCount = 50;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(invalidArgument(`metrics address ${address}: cannot listen: ${(err as Error).message}`)));
    server.listen(port, host, () => resolve());
  });
  server.on('error', (err) => logger?.warn({ err: describeError(err) }, 'metrics server'));
  const a = server.address();
  const bound = a && typeof a === 'object' ? `${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : address;
  logger?.info({ address: bound }, `metrics: Prometheus text at http://${bound}/metrics`);
  return {
    address: bound,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
