/**
 * A streamed (big) file read through the real miss filesystem (overlay →
 * FUSE → fetcher) while a hostile registry trickles one byte at a time:
 * the container's read gets EIO within the fetch deadline (not the FUSE
 * request timeout), the daemon's process survives, and once the registry is
 * healthy the next read gets the right bytes, although the trickling
 * connection is still open. Needs root, /dev/fuse and overlayfs (like
 * stream-fetch.test.ts).
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { serve, startHostileRegistry, trickle, type HostileRegistry } from '../helpers/hostile-registry.js';
import { run } from '../helpers/proc.js';
import { indexTarHeader as hdr } from './fixtures/tarbuild.js';

const FETCH_TIMEOUT = 2000;
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const big = randomBytes(1024 * 1024);

let reg: HostileRegistry;
let root: string;
let store: Awaited<ReturnType<typeof openLayerStore>> | undefined;

beforeAll(async () => {
  reg = await startHostileRegistry();
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-stream-faults-'));
});
afterEach(async () => {
  await store?.close?.();
  store = undefined;
  for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
});
afterAll(async () => {
  for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
  await fs.rm(root, { recursive: true, force: true });
  await reg?.stop();
});

async function indexLayer(): Promise<Buffer> {
  const manifest: IndexManifest = {
    version: 1,
    location: { registry: reg.host, repository: 'hostile/big' },
    files: [{ path: 'data/big', digest: sha(big), size: big.length }],
  };
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, [hdr('data', 'dir'), hdr('data/big', 'file')])) chunks.push(c);
  return Buffer.concat(chunks);
}

describe('streamed file through the miss filesystem, trickling registry', () => {
  it('a read fails with EIO within the fetch deadline; after the registry heals, the next read has the right bytes', async () => {
    reg.set((c) => trickle(c, big, 1, 200));
    store = await openLayerStore({ root, lazy: { fetchTimeoutMs: FETCH_TIMEOUT, cacheSize: '64MiB', streamMinSize: '256KiB' } });
    await store.create('idx', '', 'ro');
    await store.applyDiff('idx', '', Readable.from([await indexLayer()]));
    await store.create('ctr', 'idx', 'rw');
    const file = path.join(await store.get('ctr'), 'data/big');

    // A reader in another process (as in a container): 128 KiB from the start, uncached.
    const started = Date.now();
    const r1 = await run('dd', [`if=${file}`, 'of=/dev/null', 'bs=128k', 'count=1', 'iflag=direct'], { timeoutMs: 30_000 });
    const took = Date.now() - started;
    expect(r1.code, r1.stderr).not.toBe(0);
    expect(r1.stderr).toMatch(/Input\/output error/);
    // The fetch deadline plus scheduling slack, well under the FUSE request timeout (deadline + 5 s).
    expect(took).toBeLessThan(FETCH_TIMEOUT + 2500);

    // Healthy again; the trickling connection stays open.
    reg.set((c) => serve(c, big), { keepConnections: true });
    const r2 = await run('sh', ['-c', `dd if=${file} bs=128k count=1 iflag=direct 2>/dev/null | sha256sum`], { timeoutMs: 30_000 });
    expect(r2.stdout.split(' ')[0]).toBe(createHash('sha256').update(big.subarray(0, 128 * 1024)).digest('hex'));
    const r3 = await run('sha256sum', [file], { timeoutMs: 30_000 });
    expect(r3.stdout.split(' ')[0]).toBe(sha(big).slice(7));
  }, 60_000);
});
