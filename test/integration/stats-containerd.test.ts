/**
 * `gear stats`, the non-Gear container warning and --require-lazy on
 * `gear snapshotter` under a real containerd 1.6: a lazy run of a Gear image
 * (counts checked against the registry's blob GETs seen by a counting proxy
 * and against the metrics scrape), and an ordinary busybox image, whose
 * unpack (active "extract-" snapshots) must not count as containers while its
 * container does.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startGearContainerd, type GearContainerd } from '../helpers/containerd.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive } from '../helpers/images.js';
import { busyboxLayer as busyboxEntries, writeDockerArchive as writeEntriesArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import type { StatsReport } from '../../src/core/stats/report.js';

const PLAIN = 'docker.io/gear-test/busybox-plain:stats';
const files = { a: randomBytes(300_000), b: randomBytes(200_000), unused: randomBytes(300_000) };

let c: GearContainerd | undefined;
let strict: GearContainerd | undefined;
let reg: TestRegistry | undefined;
let proxy: FaultProxy | undefined;
let ref = '';
let plainArchive = '';

async function stats(x: GearContainerd): Promise<StatsReport> {
  return JSON.parse((await runOk(process.execPath, [GEAR_CLI, 'stats', '--root', x.gearRoot, '--json'], { timeoutMs: 60_000 })).stdout) as StatsReport;
}

/** The metrics URL from the snapshotter's log line. */
function metricsUrl(x: GearContainerd): string {
  const m = /Prometheus text at (http:\/\/[0-9.:]+\/metrics)/.exec(readFileSync(join(x.base, 'gear.log'), 'utf8'));
  if (!m) throw new Error('no metrics line in the gear log');
  return m[1]!;
}

const metric = (text: string, name: string) => {
  const m = new RegExp(`^${name.replace(/[{}"]/g, (ch) => `\\${ch}`)} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : undefined;
};

const blobGets = (from: number) => proxy!.seen.slice(from).filter((l) => l.startsWith('GET ') && l.includes('/blobs/sha256:'));

beforeAll(async () => {
  c = await startGearContainerd({ tasks: ['st1', 'plain1'], gearArgs: ['--metrics-address', '127.0.0.1:0'], gearLogLevel: 'info' });
  strict = await startGearContainerd({ tasks: ['strict1', 'strict2'], gearArgs: ['--require-lazy', '--metrics-address', '127.0.0.1:0'], gearLogLevel: 'info' });
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const bb: LayerEntry[] = await busyboxEntries();
  const src = join(c.base, 'lazy-src.tar');
  await writeEntriesArchive(src, [[...bb, { path: 'data/', type: 'dir' }, ...Object.entries(files).map(([n, f]) => ({ path: `data/${n}`, content: f, mode: 0o644 }))]], 'src/stats:v1');
  ref = `${proxy.host}/gear/stats-ctrd:v1`;
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', `docker-archive:${src}`, ref], { timeoutMs: 300_000 });
  plainArchive = join(c.base, 'plain.tar');
  await writeDockerArchive(plainArchive, PLAIN, [await busyboxLayer()]);
}, 600_000);

afterAll(async () => {
  await c?.stop();
  await strict?.stop();
  await proxy?.stop();
  await reg?.stop();
}, 240_000);

describe('gear stats on gear snapshotter (containerd 1.6)', () => {
  it('agrees with the registry\'s blob GETs and the metrics during a lazy run; the task is a container of its index layer', async () => {
    const x = c!;
    expect(statSync(join(x.gearRoot, 'gear-control.sock')).mode & 0o777).toBe(0o600);
    await x.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    const afterPull = proxy!.seen.length;
    const s0 = await stats(x);
    expect(s0.layers).toHaveLength(1);
    expect(s0.layers[0]!.fromRegistry.files).toBe(0);
    expect(s0.containers).toEqual([]);
    // Pulling a Gear image is no container, and not a non-Gear one.
    expect(s0.nonLazy.started).toBe(0);

    await x.ctrOk(['run', '-d', '--snapshotter', 'gear', ref, 'st1', '/bin/busybox', 'sh', '-c', 'cat /data/a > /dev/null && touch /tmp/ready && sleep 600'], 180_000);
    try {
      const ready = await waitFor(async () => (await x.ctr(['task', 'exec', '--exec-id', `chk${Date.now()}`, 'st1', '/bin/busybox', 'test', '-e', '/tmp/ready'], 30_000)).code === 0, 60_000, 500);
      expect(ready).toBe(true);
      const s = await stats(x);
      const gets = blobGets(afterPull);
      const l = s.layers[0]!;
      expect(gets.length).toBeGreaterThanOrEqual(2);
      expect(s.totals.fromRegistry.files).toBe(gets.length);
      expect(l.fromRegistry.files).toBe(gets.length);
      expect(l.neededFromRegistry.files).toBe(gets.length);
      const text = await (await fetch(metricsUrl(x))).text();
      expect(metric(text, 'gear_fetches_total{outcome="ok"}')).toBe(gets.length);
      expect(metric(text, 'gear_fetch_content_bytes_total')).toBe(s.totals.fromRegistry.bytes);
      expect(s.containers).toHaveLength(1);
      const ct = s.containers[0]!;
      expect(ct.name).toBe('st1');
      expect(ct.indexLayer).toBe(l.id);
      expect(ct.fromRegistry.files).toBeGreaterThanOrEqual(2);
      expect(ct.fromRegistry.bytes).toBeGreaterThanOrEqual(files.a.length);
      expect(l.containers).toBe(1);
      expect(s.nonLazy.started).toBe(0);
    } finally {
      await x.ctr(['task', 'kill', '-s', 'KILL', 'st1'], 20_000);
      await waitFor(async () => (await x.ctr(['task', 'rm', '-f', 'st1'], 20_000)).code === 0, 20_000, 250);
      await x.ctr(['container', 'rm', 'st1'], 20_000);
    }
    // containerd removes the snapshot in the background (garbage collection) after the container.
    expect(await waitFor(async () => (await stats(x)).containers.length === 0, 60_000, 500)).toBe(true);
  });

  it('warns about a container on a non-Gear image, but not about its unpack', async () => {
    const x = c!;
    await x.ctrOk(['image', 'import', '--snapshotter', 'gear', plainArchive], 300_000);
    // The import unpacked the layer through active "extract-" snapshots: no container yet.
    expect((await stats(x)).nonLazy.started).toBe(0);
    const out = await x.ctrOk(['run', '--snapshotter', 'gear', '--rm', PLAIN, 'plain1', '/bin/busybox', 'echo', 'plain ran'], 180_000);
    expect(out.trim()).toBe('plain ran');
    const s = await stats(x);
    expect(s.nonLazy.started).toBe(1);
    expect(s.nonLazy.last?.id).toBe('plain1');
    expect(s.nonLazy.last?.image).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(readFileSync(join(x.base, 'gear.log'), 'utf8')).toMatch(/NON-LAZY CONTAINER: container plain1 on image sha256:/);
    const text = await (await fetch(metricsUrl(x))).text();
    expect(metric(text, 'gear_nonlazy_containers_total')).toBe(1);
  });

  it('--require-lazy refuses the container (not the unpack) with the remedy and leaves no snapshot behind; Gear images run', async () => {
    const x = strict!;
    await x.ctrOk(['image', 'import', '--snapshotter', 'gear', plainArchive], 300_000);
    const before = await x.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls']);
    const r = await x.ctr(['run', '--snapshotter', 'gear', '--rm', PLAIN, 'strict1', '/bin/busybox', 'echo', 'should not run'], 180_000);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('should not run');
    expect(r.stderr).toMatch(/not a Gear image/);
    expect(r.stderr).toMatch(/--require-lazy/);
    expect(r.stderr).toMatch(/gear convert/);
    expect(await x.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).toBe(before);
    expect((await x.ctrOk(['containers', 'ls', '-q'])).trim()).toBe('');
    const s = await stats(x);
    expect(s.nonLazy).toMatchObject({ requireLazy: true, started: 0, refused: 1 });
    expect(metric(await (await fetch(metricsUrl(x))).text(), 'gear_nonlazy_containers_refused_total')).toBe(1);
    await x.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    const out = await x.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'strict2', '/bin/busybox', 'sh', '-c', 'wc -c < /data/b'], 180_000);
    expect(out.trim()).toBe(String(files.b.length));
  });
});
