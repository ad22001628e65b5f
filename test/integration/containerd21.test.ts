/**
 * containerd 2.1 (Debian unstable's, config version 3) with gear as a proxy
 * snapshotter, driven by its own ctr: `ctr image pull/import` on containerd
 * 2.x go through the transfer service, whose unpacker only serves the
 * snapshotters listed in its unpack_config (test/helpers/containerd.ts writes
 * overlayfs and gear). Docker 28 pulls through its own client-side unpacker
 * instead (test/integration/docker28.test.ts).
 *
 * - a plain image: ctr image import --snapshotter gear, ctr run, removal + GC;
 * - a Gear image: gear convert → registry (behind a counting proxy named in the
 *   index) → ctr image pull (config + index layer) → ctr run fetching only the
 *   opened files → removal + GC leave no Gear layer.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startGearContainerd, type GearContainerd } from '../helpers/containerd.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
const dirEntries = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((n) => !n.startsWith('.')) : []);

let c: GearContainerd;
let reg: TestRegistry;
let proxy: FaultProxy;
let bb: LayerEntry[];

beforeAll(async () => {
  c = await startGearContainerd({ containerd: '2.1', tasks: ['plain1', 'lazy1'] });
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  bb = await busyboxLayer();
}, 120_000);

afterAll(async () => {
  await c?.stop();
  await proxy?.stop();
  await reg?.stop();
}, 180_000);

const snapshotsGone = async () =>
  waitFor(async () => (await c.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).trim().split('\n').length <= 1, 60_000, 500);

describe('containerd 2.1 (config version 3, transfer service) with gear as a proxy snapshotter', () => {
  it('is containerd 2.1 and lists gear as a snapshotter plugin', async () => {
    expect(await c.ctrOk(['version'])).toMatch(/Server:\s+Version:\s+2\.1\./);
    expect(await c.ctrOk(['plugins', 'ls'])).toMatch(/io\.containerd\.snapshotter\.v1\s+gear\s+\S+\s+ok/);
  });

  it('imports, runs and garbage-collects a plain image', async () => {
    const archive = join(c.base, 'plain.tar');
    await writeDockerArchive(archive, [bb, [{ path: 'etc/', type: 'dir' }, { path: 'etc/release', content: 'two\n' }]], 'docker.io/gear-test/plain:v1');
    await c.ctrOk(['image', 'import', '--snapshotter', 'gear', archive], 300_000);
    const snaps = await c.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls']);
    expect(snaps.split('\n').filter((l) => /\bCommitted\b/.test(l)), snaps).toHaveLength(2);
    const out = await c.ctrOk(['run', '--snapshotter', 'gear', '--rm', 'docker.io/gear-test/plain:v1', 'plain1', '/bin/sh', '-c', 'cat /etc/release; echo x > /tmp/x; cat /tmp/x'], 180_000);
    expect(out).toBe('two\nx\n');
    await c.ctrOk(['image', 'rm', '--sync', 'docker.io/gear-test/plain:v1'], 120_000);
    expect(await snapshotsGone(), await c.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).toBe(true);
    expect(dirEntries(join(c.gearRoot, 'layers'))).toEqual([]);
  });

  it('pulls a Gear image (config + index layer), runs a task fetching only the files it opens, and garbage-collects', async () => {
    const files = { a: randomBytes(200_000), unused: randomBytes(200_000) };
    const src = join(c.base, 'lazy-src.tar');
    await writeDockerArchive(src, [[...bb, { path: 'data/', type: 'dir' }, ...Object.entries(files).map(([n, b]) => ({ path: `data/${n}`, content: b }))]], 'src/lazy:v1');
    const ref = `${proxy.host}/gear/lazy21:v1`;
    await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', `docker-archive:${src}`, ref], { timeoutMs: 300_000 });
    const gets = (b: Buffer) => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes(`/blobs/sha256:${hex(b)}`)).length;
    const before = proxy.seen.length;

    await c.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 300_000);
    expect(proxy.seen.slice(before).filter((l) => l.startsWith('GET ') && l.includes('/blobs/')), proxy.seen.slice(before).join('\n')).toHaveLength(2);
    expect(dirEntries(join(c.gearRoot, 'layers')).filter((id) => existsSync(join(c.gearRoot, 'layers', id, 'index')))).toHaveLength(1);

    const out = await c.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'lazy1', '/bin/busybox', 'sh', '-c', 'sha256sum /data/a | cut -c1-64; stat -c %s /data/unused'], 180_000);
    expect(out).toBe(`${hex(files.a)}\n${files.unused.length}\n`);
    expect(gets(files.a)).toBe(1);
    expect(gets(files.unused)).toBe(0);

    await c.ctrOk(['image', 'rm', '--sync', ref], 120_000);
    expect(await snapshotsGone(), await c.ctrOk(['snapshots', '--snapshotter', 'gear', 'ls'])).toBe(true);
    expect(dirEntries(join(c.gearRoot, 'layers'))).toEqual([]);
  });
});
