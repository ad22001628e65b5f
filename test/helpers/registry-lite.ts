/**
 * A minimal local registry for the integration tests: Debian's docker-registry
 * (CNCF distribution 2.8) on 127.0.0.1 with filesystem storage in a temp dir.
 *
 * Same shape as test/helpers/registry.ts (startRegistry() -> {host, url, stop()});
 * the tests prefer that module when it exists (see loadRegistryModule()).
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawnLogged, stopChild, tailFile, waitFor } from './proc.js';

export interface Registry {
  /** host:port, as used in image references. */
  host: string;
  /** http://host:port */
  url: string;
  stop(): Promise<void>;
}

export const REGISTRY_BIN = '/usr/bin/docker-registry';

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

async function ping(url: string): Promise<boolean> {
  try {
    const res = await fetch(url + '/v2/', { signal: AbortSignal.timeout(2_000) });
    await res.arrayBuffer();
    return res.status === 200;
  } catch {
    return false;
  }
}

export async function startRegistry(): Promise<Registry> {
  let lastErr = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const dir = mkdtempSync('/tmp/gr-');
    const port = await freePort();
    const host = `127.0.0.1:${port}`;
    const url = `http://${host}`;
    const config = join(dir, 'config.yml');
    writeFileSync(
      config,
      [
        'version: 0.1',
        'log:',
        '  level: warn',
        '  accesslog:',
        '    disabled: true',
        'storage:',
        '  filesystem:',
        `    rootdirectory: ${join(dir, 'data')}`,
        '  delete:',
        '    enabled: true',
        'http:',
        `  addr: ${host}`,
        '',
      ].join('\n'),
    );
    const log = join(dir, 'registry.log');
    const child = spawnLogged(REGISTRY_BIN, ['serve', config], log);
    const up = await waitFor(async () => child.exitCode === null && (await ping(url)), 20_000, 200);
    if (up) {
      let stopped = false;
      return {
        host,
        url,
        async stop() {
          if (stopped) return;
          stopped = true;
          await stopChild(child, 10_000);
          rmSync(dir, { recursive: true, force: true });
        },
      };
    }
    lastErr = tailFile(log, 30);
    await stopChild(child, 5_000);
    rmSync(dir, { recursive: true, force: true });
  }
  throw new Error(`local registry did not start; last log:\n${lastErr}`);
}

/**
 * The registry helper to use: the shared test/helpers/registry.ts when present, else this one.
 */
export async function loadStartRegistry(): Promise<() => Promise<Registry>> {
  const here = dirname(fileURLToPath(import.meta.url));
  if (existsSync(join(here, 'registry.ts'))) {
    const spec = './registry.js';
    const mod = (await import(/* @vite-ignore */ spec)) as { startRegistry?: () => Promise<Registry> };
    if (typeof mod.startRegistry === 'function') return mod.startRegistry;
  }
  return startRegistry;
}
