/**
 * Prometheus metrics of a real lazy store (registry behind a counting proxy →
 * fetcher → pool / miss filesystem → overlay), scraped over HTTP while
 * containers' reads fetch files: the figures must agree with what the registry
 * saw and with the store's own status.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openLayerStore } from '../../src/core/layers/store.js';
import { parseMetricsAddress } from '../../src/core/metrics/server.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { indexLayerTar, pushFiles } from '../helpers/gear-index.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { run } from '../helpers/proc.js';

const REPO = 'gear-test/metrics';
const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const files: Record<string, Buffer> = {
  'bin/app': randomBytes(300_000),
  'etc/conf': Buffer.from('key=value\n'),
  'etc/bad': randomBytes(5_000),
  'usr/doc': Buffer.from('never read '.repeat(100)),
};

let reg: TestRegistry;
let proxy: FaultProxy;
let root: string;
let tar: Buffer;

/** Samples of one scrape: `name{labels}` → value. */
async function scrape(endpoint: string): Promise<Map<string, number>> {
  const res = await fetch(`http://${endpoint}/metrics`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  const out = new Map<string, number>();
  for (const line of (await res.text()).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    out.set(line.slice(0, sp), Number(line.slice(sp + 1)));
  }
  return out;
}
const blobGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:')).length;

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  await pushFiles(reg.host, REPO, files);
  tar = await indexLayerTar(proxy.host, REPO, files);
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-metrics-'));
}, 60_000);

afterAll(async () => {
  if (root) {
    for (const m of mountsUnder(path.join(root, 'layers'))) await run('umount', ['-l', m.mountPoint]);
    for (const m of mountsUnder(root)) await run('umount', ['-l', m.mountPoint]);
    await fs.rm(root, { recursive: true, force: true });
  }
  await proxy?.stop();
  await reg?.stop();
});

describe('metrics', () => {
  it('parses listen addresses and refuses others with the expected form', () => {
    expect(parseMetricsAddress('127.0.0.1:9495')).toEqual({ host: '127.0.0.1', port: 9495 });
    expect(parseMetricsAddress(':9495')).toEqual({ host: '0.0.0.0', port: 9495 });
    expect(parseMetricsAddress('[::1]:0')).toEqual({ host: '::1', port: 0 });
    for (const bad of ['9495', '127.0.0.1', 'host:99999', 'a b:1', '']) expect(() => parseMetricsAddress(bad)).toThrow(/expected HOST:PORT/);
  });

  it('a scrape during a lazy run shows the fetches, misses, bytes and latencies the registry saw', async () => {
    const store = await openLayerStore({ root, lazy: { fetchTimeoutMs: 5_000, cacheSize: '64MiB' }, metricsAddress: '127.0.0.1:0' });
    const endpoint = store.metricsEndpoint!;
    try {
      expect(endpoint).toMatch(/^127\.0\.0\.1:\d+$/);
      expect(Object.fromEntries(await store.status())['Metrics']).toBe(`http://${endpoint}/metrics`);
      let m = await scrape(endpoint);
      expect(m.get('gear_index_layers')).toBe(0);
      expect(m.get('gear_pool_misses_total')).toBe(0);
      expect(m.get('gear_fetches_total{outcome="ok"}')).toBe(0);
      expect(m.get('gear_pool_capacity_bytes')).toBe(64 * 1024 * 1024);
      expect(m.get('process_resident_memory_bytes')).toBeGreaterThan(0);

      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([tar]));
      await store.create('ctr', 'idx', 'rw');
      const merged = await store.get('ctr');
      const before = blobGets();
      expect(await fs.readFile(path.join(merged, 'bin/app'))).toEqual(files['bin/app']);
      expect(await fs.readFile(path.join(merged, 'etc/conf'))).toEqual(files['etc/conf']);
      const fetched = blobGets() - before;
      expect(fetched).toBe(2);

      m = await scrape(endpoint);
      expect(m.get('gear_layers')).toBe(2);
      expect(m.get('gear_index_layers')).toBe(1);
      // Two cold files: two misses, no hit (a cold fetch used to count as a hit).
      expect(m.get('gear_pool_misses_total')).toBe(2);
      expect(m.get('gear_pool_hits_total')).toBe(0);
      expect(m.get('gear_fetches_total{outcome="ok"}')).toBe(fetched);
      expect(m.get('gear_fetch_duration_seconds_count{outcome="ok"}')).toBe(fetched);
      expect(m.get('gear_fetch_duration_seconds_sum{outcome="ok"}')).toBeGreaterThan(0);
      expect(m.get('gear_fetch_size_bytes_sum')).toBe(files['bin/app']!.length + files['etc/conf']!.length);
      expect(m.get('gear_fetch_content_bytes_total')).toBe(files['bin/app']!.length + files['etc/conf']!.length);
      expect(m.get('gear_fetch_received_bytes_total')).toBeGreaterThan(0);
      expect(m.get('gear_pool_files')).toBe(2);
      expect(m.get('gear_pool_bytes')).toBe(files['bin/app']!.length + files['etc/conf']!.length);
      expect(m.get('gear_fuse_requests_total{opcode="LOOKUP"}')).toBeGreaterThanOrEqual(2);
      // The default GEAR_FUSE_OPEN=none: the first OPEN is answered ENOSYS and the kernel opens files
      // alone from then on, so reading both files again (same mount, cached pages) costs no request.
      expect((await store.status()).find(([k]) => k === 'FUSE Opens')?.[1]).toMatch(/^none/);
      const opens = m.get('gear_fuse_requests_total{opcode="OPEN"}')!;
      expect(opens).toBeGreaterThanOrEqual(1);
      const reads = m.get('gear_fuse_requests_total{opcode="READ"}')!;
      expect(reads).toBeGreaterThanOrEqual(2);
      expect(await fs.readFile(path.join(merged, 'bin/app'))).toEqual(files['bin/app']);
      expect(await fs.readFile(path.join(merged, 'etc/conf'))).toEqual(files['etc/conf']);
      m = await scrape(endpoint);
      expect(m.get('gear_fuse_requests_total{opcode="OPEN"}')).toBe(opens);
      expect(m.get('gear_fuse_requests_total{opcode="READ"}')).toBe(reads);
      // The status docker info shows agrees.
      const status = Object.fromEntries(await store.status());
      expect(Number(status['Fetched Files'])).toBe(m.get('gear_fetches_total{outcome="ok"}'));

      // A corrupted blob: the read fails, nothing enters the pool, and the failure is counted as such.
      proxy.setDecider((req) => (req.url?.includes(sha(files['etc/bad']!).slice(7)) ? { kind: 'flip' } : undefined));
      await expect(fs.readFile(path.join(merged, 'etc/bad'))).rejects.toMatchObject({ code: 'EIO' });
      proxy.setDecider(() => undefined);
      m = await scrape(endpoint);
      expect(m.get('gear_fetches_total{outcome="verify_failed"}')).toBe(1);
      expect(m.get('gear_fetch_duration_seconds_count{outcome="verify_failed"}')).toBe(1);
      expect(m.get('gear_pool_files')).toBe(2);

      // A registry that lost a blob: an HTTP error, counted as such.
      proxy.setDecider((req) => (req.url?.includes(sha(files['usr/doc']!).slice(7)) ? { kind: 'status', status: 404 } : undefined));
      await expect(fs.readFile(path.join(merged, 'usr/doc'))).rejects.toMatchObject({ code: 'EIO' });
      proxy.setDecider(() => undefined);
      m = await scrape(endpoint);
      expect(m.get('gear_fetches_total{outcome="http_error"}')).toBe(1);
      expect(m.get('gear_fetches_total{outcome="ok"}')).toBe(fetched);
      expect(m.get('gear_fetches_total{outcome="deadline"}')).toBe(0);

      // No label carries a digest, a path or a layer id (bounded label values).
      for (const k of m.keys()) expect(k).not.toMatch(/sha256|[0-9a-f]{32}|ctr|idx/);
      // Only /metrics answers.
      expect((await fetch(`http://${endpoint}/`)).status).toBe(404);
      expect((await fetch(`http://${endpoint}/metrics`, { method: 'POST', body: 'x' })).status).toBe(405);
      await store.put('ctr');
    } finally {
      await store.close?.();
    }
    // Closing the store closes the endpoint.
    expect(store.metricsEndpoint).toBeUndefined();
    await expect(fetch(`http://${endpoint}/metrics`)).rejects.toThrow();
  });

  it('background fetch gauges follow the completion of a pulled image; zero when it is off', async () => {
    const bgRoot = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-metrics-bg-'));
    const store = await openLayerStore({ root: bgRoot, lazy: { fetchTimeoutMs: 5_000, cacheSize: '64MiB', backgroundFetch: true }, metricsAddress: '127.0.0.1:0' });
    try {
      const endpoint = store.metricsEndpoint!;
      expect((await scrape(endpoint)).get('gear_background_fetch_files')).toBe(0);
      await store.create('idx', '', 'ro');
      await store.applyDiff('idx', '', Readable.from([tar]));
      let m = await scrape(endpoint);
      for (let i = 0; i < 200 && m.get('gear_background_fetch_running_layers') !== 0; i++) {
        await new Promise((r) => setTimeout(r, 100));
        m = await scrape(endpoint);
      }
      const n = Object.keys(files).length;
      expect(m.get('gear_background_fetch_files')).toBe(n);
      expect(m.get('gear_background_fetch_done_files')).toBe(n);
      expect(m.get('gear_background_fetch_done_bytes')).toBe(Object.values(files).reduce((t, b) => t + b.length, 0));
      expect(m.get('gear_background_fetch_failed_files')).toBe(0);
      expect(m.get('gear_pool_files')).toBe(n);
    } finally {
      await store.close?.();
      for (const mt of mountsUnder(bgRoot)) await run('umount', ['-l', mt.mountPoint]);
      await fs.rm(bgRoot, { recursive: true, force: true });
    }
    // Off (the default, as in the test above): zeros.
    const offRoot = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-metrics-off-'));
    const off = await openLayerStore({ root: offRoot, lazy: { fetchTimeoutMs: 5_000, cacheSize: '64MiB' }, metricsAddress: '127.0.0.1:0' });
    try {
      const m = await scrape(off.metricsEndpoint!);
      expect(m.get('gear_background_fetch_files')).toBe(0);
      expect(m.get('gear_background_fetch_running_layers')).toBe(0);
    } finally {
      await off.close?.();
      for (const mt of mountsUnder(offRoot)) await run('umount', ['-l', mt.mountPoint]);
      await fs.rm(offRoot, { recursive: true, force: true });
    }
  });
});
