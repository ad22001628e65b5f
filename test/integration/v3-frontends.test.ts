/**
 * Format v3 images run lazily on both frontends: a gear dockerd (the Docker
 * graph-driver plugin) and a containerd 1.6 with gear as its proxy
 * snapshotter. The image (busybox + small files + a chunked big file + a
 * corrupt member) is a v3 repack of `gear convert` output (test/helpers/
 * v3-image.ts) in a real registry behind a counting proxy, which the index
 * names as the location of its packs.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startGearContainerd, type GearContainerd } from '../helpers/containerd.js';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk } from '../helpers/proc.js';
import { readIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';
import { pushV3Image, type V3Image } from '../helpers/v3-image.js';

const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const MiB = 1024 * 1024;

let reg: TestRegistry;
let proxy: FaultProxy;
let work: string;
let img: V3Image;
let v2ref: string;
const small: Record<string, Buffer> = {};
for (let i = 0; i < 60; i++) small[`data/s${String(i).padStart(2, '0')}`] = Buffer.from(`small file ${i}\n${'all work and no play makes a dull pack '.repeat(30 + i)}`);
const big = Buffer.concat([randomBytes(MiB + 4321), Buffer.alloc(2 * MiB, 'q'), randomBytes(2 * MiB)]);
const bad = Buffer.from('this file gets a corrupted byte in its pack member\n'.repeat(40));

const packGets = () => proxy.seen.filter((l) => l.startsWith('GET ') && img.packs.some((p) => l.includes(`/blobs/${p.digest}`))).length;
const fileGets = (c: Buffer) => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes(hex(c))).length;
const WALK = `cat ${Object.keys(small).map((p) => `/${p}`).join(' ')} | sha256sum | cut -c1-64`;
const walkSum = () => hex(Buffer.concat(Object.keys(small).map((p) => small[p]!)));
const BIG_READS = 'dd if=/data/big bs=1 skip=1048570 count=12 2>/dev/null | sha256sum | cut -c1-64; sha256sum /data/big | cut -c1-64; sha256sum /data/s00 /data/s30 /data/s59 | cut -c1-64';
/** Every Gear file of the image but the corrupt one, and whether each is in a pool. */
const goodDigests = () => img.index.files.filter((f) => f.path !== 'data/zbad').map((f) => f.digest);
const zbadDigest = () => img.index.files.find((f) => f.path === 'data/zbad')!.digest;
const pooled = (gearRoot: string) => (digest: string) => existsSync(join(gearRoot, 'pool', 'sha256', digest.slice(7, 9), digest.slice(7)));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const bigReadsOut = () => [hex(big.subarray(1048570, 1048582)), hex(big), hex(small['data/s00']!), hex(small['data/s30']!), hex(small['data/s59']!)].join('\n');

beforeAll(async () => {
  expect(await gearDaemonAvailable()).toBe(true);
  work = mkdtempSync('/tmp/gear-v3-fe-');
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  const bb: LayerEntry[] = await busyboxLayer();
  const entries: LayerEntry[] = [
    ...bb,
    { path: 'data/', type: 'dir' },
    ...Object.entries(small).map(([p, c]) => ({ path: p, content: c, mode: 0o644 })),
    { path: 'data/big', content: big, mode: 0o644 },
    { path: 'data/zbad', content: bad, mode: 0o644 },
  ];
  const archive = join(work, 'src.tar');
  await writeDockerArchive(archive, [entries], 'src/v3:v1');
  img = await pushV3Image({ archive, work, registryHost: reg.host, location: { registry: proxy.host, repository: 'gear/v3' }, tag: 'v1', corrupt: ['data/zbad'] });
  expect(img.index.files.find((f) => f.path === 'data/big')?.chunks?.length).toBe(6);
  // The same image in format v2 (one raw blob per file), for the shared-pool check.
  v2ref = `${proxy.host}/gear/v2:v1`;
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--no-progress', '--storage', 'raw', '--format-version', '2', `docker-archive:${archive}`, v2ref], { timeoutMs: 300_000 });
}, 600_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

/** The index of a Gear image in the test registry. */
async function registryIndex(repo: string, tag: string): Promise<IndexManifest> {
  const get = async (p: string, accept?: string) => {
    const res = await fetch(`${reg.url}/v2/${repo}/${p}`, accept ? { headers: { accept } } : {});
    expect(res.status).toBe(200);
    return Buffer.from(await res.arrayBuffer());
  };
  const m = JSON.parse((await get(`manifests/${tag}`, 'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json')).toString('utf8')) as { layers: Array<{ digest: string }> };
  let layer = await get(`blobs/${m.layers[0]!.digest}`);
  if (layer[0] === 0x1f) layer = gunzipSync(layer);
  return (await readIndexLayer((async function* () { yield layer; })())).manifest;
}

describe('format v3 on the Docker graph-driver plugin', () => {
  let d: Dockerd | undefined;
  beforeAll(async () => {
    d = await startDockerd({ driver: 'gear', gearArgs: ['--fetch-timeout', '20s'] });
  }, 300_000);
  afterAll(async () => {
    await d?.stop();
  });

  it('runs lazily: a walk of 60 small files costs a few pack requests; first/middle/last members and chunk boundaries read right; a corrupt member is EIO', async () => {
    await d!.dockerOk(['pull', img.ref]);
    expect(packGets()).toBe(0);
    let before = packGets();
    const walk = await d!.dockerOk(['run', '--rm', img.ref, 'sh', '-c', WALK]);
    expect(walk.stdout.trim()).toBe(walkSum());
    const walkRequests = packGets() - before;
    expect(walkRequests).toBeGreaterThan(0);
    expect(walkRequests).toBeLessThanOrEqual(6); // busybox, /etc files and 60 docs: not one request per file
    const r = await d!.dockerOk(['run', '--rm', img.ref, 'sh', '-c', BIG_READS]);
    expect(r.stdout.trim()).toBe(bigReadsOut());
    before = packGets();
    const c = await d!.docker(['run', '--rm', img.ref, 'cat', '/data/zbad']);
    expect(c.code).not.toBe(0);
    expect(c.stderr).toMatch(/Input\/output error/);
    // The other files of its pack still read.
    const ok = await d!.dockerOk(['run', '--rm', img.ref, 'sha256sum', '/data/s10']);
    expect(ok.stdout.slice(0, 64)).toBe(hex(small['data/s10']!));
  });

  it('gear prefetch --from-pool lists what the task opened when recorded with GEAR_READ_AHEAD=0; recorded with read-ahead on, also the neighbours it brought, and says so', async () => {
    const lists: Record<string, { paths: string[]; notices: string[] }> = {};
    for (const [name, readAhead] of [['off', '0'], ['on', undefined]] as const) {
      const rec = await startDockerd({ driver: 'gear', gearArgs: ['--fetch-timeout', '20s'], ...(readAhead !== undefined ? { gearEnv: { GEAR_READ_AHEAD: readAhead } } : {}) });
      try {
        const out = await rec.dockerOk(['run', '--rm', img.ref, 'cat', '/data/s10', '/data/s40']);
        expect(out.stdout).toBe(small['data/s10']!.toString() + small['data/s40']!.toString());
        const r = await runOk(process.execPath, [GEAR_CLI, 'prefetch', '--json', '--from-pool', join(rec.gearRoot!, 'pool'), img.ref, `${reg.host}/gear/v3:rec-${name}`], { timeoutMs: 120_000 });
        const summary = JSON.parse(r.stdout) as { prefetch: number; notices: string[] };
        const paths = (await registryIndex('gear/v3', `rec-${name}`)).prefetch ?? [];
        expect(paths).toHaveLength(summary.prefetch);
        lists[name] = { paths, notices: summary.notices };
      } finally {
        await rec.stop();
      }
    }
    // Without read-ahead: the two files the task opened, in that order, and none of their neighbours.
    const off = lists.off!;
    expect(off.paths.filter((p) => p.startsWith('data/'))).toEqual(['data/s10', 'data/s40']);
    expect(off.notices).toEqual([]);
    // With it: the misses brought their pack neighbours along, and the list holds them too.
    const on = lists.on!;
    expect(on.paths).toContain('data/s11');
    expect(on.paths.length).toBeGreaterThan(off.paths.length);
    expect(on.notices).toHaveLength(1);
    expect(on.notices[0]).toMatch(/read-ahead on .*GEAR_READ_AHEAD=0/);
  }, 300_000);

  it('background fetch (GEAR_BACKGROUND_FETCH=on) completes a pulled image into the cache, a corrupt member excepted: containers then run with the registry gone', async () => {
    const bg = await startDockerd({ driver: 'gear', gearArgs: ['--fetch-timeout', '5s'], gearEnv: { GEAR_BACKGROUND_FETCH: 'on' } });
    try {
      await bg.dockerOk(['pull', img.ref]);
      const has = pooled(bg.gearRoot!);
      for (let i = 0; i < 150 && !goodDigests().every(has); i++) await sleep(200);
      expect(goodDigests().filter((d) => !has(d))).toEqual([]);
      expect(has(zbadDigest())).toBe(false);
      const info = await bg.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
      const status = Object.fromEntries(JSON.parse(info.stdout) as Array<[string, string]>);
      // Every file missing at the pull is in the pool but the corrupt one.
      const bgLine = /^on: (\d+) of (\d+) missing files in the pool .*1 failed/.exec(status['Background Fetch'] ?? '');
      expect(bgLine, status['Background Fetch']).not.toBeNull();
      expect(Number(bgLine![1])).toBe(Number(bgLine![2]) - 1);
      // The registry is gone: every request fails, and the containers do not notice.
      const before = proxy.seen.length;
      proxy.setDecider(() => ({ kind: 'status', status: 503 }));
      try {
        const r = await bg.dockerOk(['run', '--rm', img.ref, 'sh', '-c', `${WALK}; ${BIG_READS}`]);
        expect(r.stdout.trim()).toBe(`${walkSum()}\n${bigReadsOut()}`);
        expect(proxy.seen.length).toBe(before);
      } finally {
        proxy.setDecider(() => undefined);
      }
    } finally {
      await bg.stop();
    }
  }, 300_000);

  it('a v2 image with the same files reads them from the pool the v3 image filled', async () => {
    await d!.dockerOk(['pull', v2ref]);
    const r = await d!.dockerOk(['run', '--rm', v2ref, 'sha256sum', '/data/s00', '/data/big']);
    expect(r.stdout.split('\n').map((l) => l.slice(0, 64)).filter(Boolean)).toEqual([hex(small['data/s00']!), hex(big)]);
    expect(fileGets(small['data/s00']!)).toBe(0);
    expect(fileGets(big)).toBe(0);
  });
});

describe('format v3 on the containerd snapshotter', () => {
  let c: GearContainerd | undefined;
  beforeAll(async () => {
    c = await startGearContainerd({ tasks: ['v3a', 'v3b', 'v3c'] });
  }, 120_000);
  afterAll(async () => {
    await c?.stop();
  }, 180_000);

  it('runs lazily: coalesced walk, right bytes at pack positions and chunk boundaries, EIO for a corrupt member', async () => {
    await c!.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', img.ref], 300_000);
    const before = packGets();
    const walk = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', img.ref, 'v3a', '/bin/busybox', 'sh', '-c', WALK], 180_000);
    expect(walk.trim()).toBe(walkSum());
    expect(packGets() - before).toBeLessThanOrEqual(6);
    const r = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', img.ref, 'v3b', '/bin/busybox', 'sh', '-c', `${BIG_READS}; cat /data/zbad >/dev/null 2>&1 && echo read || echo failed`], 180_000);
    expect(r.trim()).toBe(`${bigReadsOut()}\nfailed`);
  });
});

describe('format v3 on the containerd snapshotter with --background-fetch', () => {
  let c: GearContainerd | undefined;
  beforeAll(async () => {
    c = await startGearContainerd({ tasks: ['v3bg'], gearArgs: ['--background-fetch'] });
  }, 120_000);
  afterAll(async () => {
    await c?.stop();
  }, 180_000);

  it('completes the pulled image into the cache: a container then runs with the registry gone', async () => {
    await c!.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', img.ref], 300_000);
    const has = pooled(c!.gearRoot);
    for (let i = 0; i < 150 && !goodDigests().every(has); i++) await sleep(200);
    expect(goodDigests().filter((d) => !has(d))).toEqual([]);
    expect(has(zbadDigest())).toBe(false);
    const before = proxy.seen.length;
    proxy.setDecider(() => ({ kind: 'status', status: 503 }));
    try {
      const r = await c!.ctrOk(['run', '--snapshotter', 'gear', '--rm', img.ref, 'v3bg', '/bin/busybox', 'sh', '-c', `${WALK}; ${BIG_READS}`], 180_000);
      expect(r.trim()).toBe(`${walkSum()}\n${bigReadsOut()}`);
      expect(proxy.seen.length).toBe(before);
    } finally {
      proxy.setDecider(() => undefined);
    }
  });
});
