/**
 * Minimal Docker Engine API client over the daemon's unix socket, so that the
 * lifecycle benchmark times dockerd and the storage driver, not the start-up
 * of a docker CLI process per call. Every request is bounded by a timeout.
 */
import { Agent, request } from 'node:http';

export interface EngineResponse {
  status: number;
  body: string;
}

export class Engine {
  private readonly agent: Agent;

  constructor(
    readonly socketPath: string,
    readonly apiVersion = 'v1.41',
  ) {
    this.agent = new Agent({ keepAlive: true, maxSockets: 4 });
  }

  call(method: string, path: string, body?: unknown, timeoutMs = 120_000): Promise<EngineResponse> {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    return new Promise((resolve, reject) => {
      const req = request(
        {
          socketPath: this.socketPath,
          agent: this.agent,
          method,
          path: `/${this.apiVersion}${path}`,
          headers: payload ? { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(payload) } : {},
          timeout: timeoutMs,
        },
        (res) => {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (text += c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end(payload);
    });
  }

  async ok(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<string> {
    const r = await this.call(method, path, body, timeoutMs);
    if (r.status < 200 || r.status >= 300) throw new Error(`${method} ${path}: HTTP ${r.status}: ${r.body.slice(0, 2000)}`);
    return r.body;
  }

  async create(image: string, cmd: string[]): Promise<string> {
    const body = await this.ok('POST', '/containers/create', {
      Image: image,
      Cmd: cmd,
      AttachStdout: false,
      AttachStderr: false,
      HostConfig: { NetworkMode: 'none' },
    });
    return (JSON.parse(body) as { Id: string }).Id;
  }

  async start(id: string): Promise<void> {
    await this.ok('POST', `/containers/${id}/start`);
  }

  async wait(id: string): Promise<number> {
    const body = await this.ok('POST', `/containers/${id}/wait`);
    return (JSON.parse(body) as { StatusCode: number }).StatusCode;
  }

  async remove(id: string): Promise<void> {
    await this.ok('DELETE', `/containers/${id}?v=1&force=1`);
  }

  close(): void {
    this.agent.destroy();
  }
}
