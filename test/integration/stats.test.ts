/**
 * `gear stats` on a real gear dockerd during and after a lazy run, checked
 * against the registry's own count of blob GETs (a counting proxy in front of
 * the registry, which the Gear index names as the files' registry) and against
 * a scrape of the daemon's Prometheus metrics; and the non-Gear container
 * warning (log, docker info, metric, gear stats) and --require-lazy with an
 * ordinary busybox image.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { importBusybox } from '../helpers/images.js';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { run, runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import type { StatsReport } from '../../src/core/stats/report.js';

const hex = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

let reg: TestRegistry;
let proxy: FaultProxy;
let work: string;
let A: Dockerd | undefined;
let R: Dockerd | undefined;
let available = false;
let ref: string;
const files = { a: randomBytes(300_000), b: randomBytes(200_000), unused: randomBytes(300_000) };

/** GETs of Gear-file-sized blobs: every blob GET after the pull (convert stores files raw). */
const blobGets = (from: number) => proxy.seen.slice(from).filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:'));

async function stats(d: Dockerd): Promise<StatsReport> {
  const r = await runOk(process.execPath, [GEAR_CLI, 'stats', '--root', d.gearRoot!, '--json'], { timeoutMs: 60_000 });
  return JSON.parse(r.stdout) as StatsReport;
}

async function info(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  return Object.fromEntries(JSON.parse(r.stdout) as [string, string][]);
}

async function scrape(d: Dockerd): Promise<string> {
  const url = (await info(d))['Metrics']!;
  expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
  return (await fetch(url)).text();
}

const metric = (text: string, name: string) => {
  const m = new RegExp(`^${name.replace(/[{}"]/g, (c) => `\\${c}`)} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : undefined;
};

beforeAll(async () => {
  available = await gearDaemonAvailable();
  if (!available) return;
  work = mkdtempSync('/tmp/gear-stats-it-');
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const bb: LayerEntry[] = await busyboxLayer();
  const src = join(work, 'src.tar');
  await writeDockerArchive(
    src,
    [[...bb, { path: 'data/', type: 'dir' }, ...Object.entries(files).map(([n, c]) => ({ path: `data/${n}`, content: c, mode: 0o644 }))]],
    'src/stats:v1',
  );
  ref = `${proxy.host}/gear/stats:v1`;
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', `docker-archive:${src}`, ref], { timeoutMs: 600_000 });
  A = await startDockerd({ driver: 'gear', gearArgs: ['--metrics-address', '127.0.0.1:0'] });
  R = await startDockerd({ driver: 'gear', gearArgs: ['--require-lazy', '--metrics-address', '127.0.0.1:0'] });
}, 900_000);

afterAll(async () => {
  await A?.stop();
  await R?.stop();
  await proxy?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
}, 180_000);

describe('gear stats on a gear dockerd', () => {
  it('agrees with the registry\'s blob GETs and the metrics during and after a lazy run, per index layer and per container', async () => {
    expect(available, "gear daemon must be buildable and runnable here").toBe(true);
    const d = A!;
    // The control socket is root's only.
    expect(statSync(join(d.gearRoot!, 'gear-control.sock')).mode & 0o777).toBe(0o600);
    await d.dockerOk(['pull', ref]);
    const afterPull = proxy.seen.length;
    const s0 = await stats(d);
    expect(s0.layers).toHaveLength(1);
    const layer0 = s0.layers[0]!;
    expect(layer0.location).toBe(`${proxy.host}/gear/stats`);
    expect(layer0.fromRegistry.files).toBe(0);
    expect(layer0.total.files).toBeGreaterThanOrEqual(4); // bin/busybox, data/a, data/b, data/unused (and a few of /etc)
    expect(layer0.total.bytes).toBeGreaterThan(files.a.length + files.b.length + files.unused.length);
    expect(s0.containers).toEqual([]);

    // A running container that has read /data/a and waits.
    const id = (await d.dockerOk(['run', '-d', ref, 'sh', '-c', 'cat /data/a > /dev/null && touch /tmp/ready && sleep 600'])).stdout.trim();
    try {
      expect(await waitFor(async () => (await d.docker(['exec', id, 'test', '-e', '/tmp/ready'])).code === 0, 60_000, 250)).toBe(true);
      const upper = (await d.dockerOk(['inspect', '-f', '{{.GraphDriver.Data.UpperDir}}', id])).stdout.trim();
      const layerId = basename(dirname(upper));
      const during = await stats(d);
      const gets = blobGets(afterPull);
      const l = during.layers[0]!;
      // Every Gear file downloaded is one blob GET at the registry, and the metrics count the same downloads.
      expect(gets.length).toBeGreaterThanOrEqual(2); // busybox and data/a
      expect(gets.some((g) => g.includes(hex(files.a)))).toBe(true);
      expect(gets.some((g) => g.includes(hex(files.b)))).toBe(false);
      expect(during.totals.fromRegistry.files).toBe(gets.length);
      expect(l.fromRegistry.files).toBe(gets.length);
      expect(l.inPool.files).toBe(gets.length);
      expect(l.neededFromRegistry.files).toBe(gets.length);
      const text = await scrape(d);
      expect(metric(text, 'gear_fetches_total{outcome="ok"}')).toBe(gets.length);
      expect(metric(text, 'gear_fetch_content_bytes_total')).toBe(during.totals.fromRegistry.bytes);
      expect(metric(text, 'gear_pool_misses_total')).toBe(l.neededFromRegistry.files);
      expect(l.fromRegistry.bytes).toBeGreaterThanOrEqual(files.a.length);
      // The container: the files its processes caused to be fetched (busybox, data/a, …).
      expect(l.containers).toBe(1);
      expect(during.containers).toHaveLength(1);
      const c = during.containers[0]!;
      expect(c.id).toBe(layerId);
      expect(c.indexLayer).toBe(l.id);
      expect(c.fromRegistry.files).toBeGreaterThanOrEqual(2);
      expect(c.fromRegistry.files).toBeLessThanOrEqual(gets.length);
      expect(c.fromRegistry.bytes).toBeGreaterThanOrEqual(files.a.length);
      expect(during.nonLazy.started).toBe(0);

      // The table form names the layer and the container.
      const table = (await runOk(process.execPath, [GEAR_CLI, 'stats', '--root', d.gearRoot!], { timeoutMs: 60_000 })).stdout;
      expect(table).toContain(l.id.slice(0, 12));
      expect(table).toContain(layerId.slice(0, 12));
      expect(table).toMatch(/not counted per container/);

      // A second read of a cached file costs no GET; a new file one more.
      await d.dockerOk(['exec', id, 'sh', '-c', 'cat /data/a /data/b > /dev/null']);
      const after = await stats(d);
      const gets2 = blobGets(afterPull);
      expect(gets2.length).toBe(gets.length + 1);
      expect(after.totals.fromRegistry.files).toBe(gets2.length);
      expect(after.containers[0]!.fromRegistry.files).toBe(c.fromRegistry.files + 1);
      expect(metric(await scrape(d), 'gear_fetches_total{outcome="ok"}')).toBe(gets2.length);
    } finally {
      await d.docker(['rm', '-f', id]);
    }
    // After the container: it is gone from the report, the layer's counts stay.
    const end = await stats(d);
    expect(end.containers).toEqual([]);
    expect(end.layers[0]!.fromRegistry.files).toBe(blobGets(afterPull).length);
    expect(end.layers[0]!.containers).toBe(0);
  });

  it('warns loudly about a container on a non-Gear image: log, docker info, metric, gear stats', async () => {
    expect(available, "gear daemon must be buildable and runnable here").toBe(true);
    const d = A!;
    await importBusybox(d, 'plain/busybox:stats');
    expect((await info(d))['Non-Gear Containers']).toMatch(/^0 started, 0 refused$/);
    const out = await d.dockerOk(['run', '--rm', 'plain/busybox:stats', 'echo', 'plain ran']);
    expect(out.stdout.trim()).toBe('plain ran');
    const st = await info(d);
    expect(st['Non-Gear Containers']).toMatch(/^1 started, 0 refused \(last: [0-9a-f]{12}/);
    expect(st['Require Lazy']).toMatch(/^off/);
    expect(readFileSync(d.logs.gear!, 'utf8')).toMatch(/NON-LAZY CONTAINER: container [0-9a-f]{64}-init on image [0-9a-f]{64}/);
    const text = await scrape(d);
    expect(metric(text, 'gear_nonlazy_containers_total')).toBe(1);
    expect(metric(text, 'gear_require_lazy')).toBe(0);
    const s = await stats(d);
    expect(s.nonLazy.started).toBe(1);
    expect(s.nonLazy.last?.id).toMatch(/-init$/);
    // A Gear container is not counted.
    await d.dockerOk(['run', '--rm', ref, 'true']);
    expect((await stats(d)).nonLazy.started).toBe(1);
  });

  it('--require-lazy refuses a non-Gear image with the remedy, leaves nothing behind, and runs Gear images', async () => {
    expect(available, "gear daemon must be buildable and runnable here").toBe(true);
    const d = R!;
    await importBusybox(d, 'plain/busybox:strict');
    const layersDir = join(d.gearRoot!, 'layers');
    const before = readdirSync(layersDir).filter((n) => !n.startsWith('.')).sort();
    const r = await d.docker(['run', '--rm', 'plain/busybox:strict', 'echo', 'should not run']);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('should not run');
    expect(r.stderr).toMatch(/not a Gear image/);
    expect(r.stderr).toMatch(/--require-lazy/);
    expect(r.stderr).toMatch(/gear convert/);
    // Nothing half-created: no layer, no leftover temp dir, no container.
    expect(readdirSync(layersDir).sort()).toEqual(before);
    expect((await d.dockerOk(['ps', '-aq'])).stdout.trim()).toBe('');
    const st = await info(d);
    expect(st['Require Lazy']).toMatch(/^on/);
    expect(st['Non-Gear Containers']).toMatch(/^0 started, 1 refused/);
    const text = await scrape(d);
    expect(metric(text, 'gear_nonlazy_containers_refused_total')).toBe(1);
    expect(metric(text, 'gear_require_lazy')).toBe(1);
    // A Gear image runs.
    await d.dockerOk(['pull', ref]);
    const out = await d.dockerOk(['run', '--rm', ref, 'sh', '-c', 'wc -c < /data/b']);
    expect(out.stdout.trim()).toBe(String(files.b.length));
    expect(existsSync(join(d.gearRoot!, 'gear-control.sock'))).toBe(true);
  });

  it('gear stats says clearly when no daemon serves the root', async () => {
    const dir = mkdtempSync('/tmp/gear-stats-none-');
    try {
      const r = await run(process.execPath, [GEAR_CLI, 'stats', '--root', dir], { timeoutMs: 30_000 });
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/no Gear daemon is serving|no Gear pool/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
