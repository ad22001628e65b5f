/**
 * Lazy Gear layers end to end: gear convert → registry → docker pull on a
 * gear dockerd → docker run, with real overlayfs (metacopy, data-only
 * layers) and the FUSE miss filesystem. A fault proxy in front of the
 * registry counts the Gear file GETs and injects faults (hang, reset, flip).
 *
 * The Gear index names the proxy as the files' registry, so every lazy
 * fetch of the gear daemon goes through it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { busyboxLayer, readAll, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { ensureMinbaseTar } from '../helpers/images.js';
import { run, runOk } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

let reg: TestRegistry;
let proxy: FaultProxy;
let work: string;
let A: Dockerd | undefined;
let B: Dockerd | undefined;
let available = false;

/** Gear file GETs seen by the proxy for one content. */
const gets = (content: Buffer | string) => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes(hex(content))).length;

async function convert(layers: (LayerEntry[] | Buffer)[], name: string, storage: 'raw' | 'auto' = 'raw'): Promise<string> {
  const file = join(work, `${name.replaceAll('/', '_')}.tar`);
  await writeDockerArchive(file, layers, `src/${name}`);
  const ref = `${proxy.host}/${name}`;
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--no-progress', '--format-version', '2', '--storage', storage, `docker-archive:${file}`, ref], { timeoutMs: 600_000 });
  rmSync(file, { force: true });
  return ref;
}

async function info(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  return Object.fromEntries(JSON.parse(r.stdout) as [string, string][]);
}

const files = {
  a: randomBytes(300_000),
  b: randomBytes(300_000),
  unused: randomBytes(300_000),
  c: randomBytes(200_000),
  d: randomBytes(100_000),
  e: randomBytes(400_000),
  f: randomBytes(400_000),
  g: randomBytes(400_000),
  flip: randomBytes(50_000),
  down: randomBytes(50_000),
  h: randomBytes(200_000),
  i: randomBytes(200_000),
  j: randomBytes(200_000),
  k: randomBytes(300_000),
};
let bb: LayerEntry[];
const withFiles = (names: (keyof typeof files)[]): LayerEntry[] => [
  ...bb,
  { path: 'data/', type: 'dir' },
  ...names.map((n) => ({ path: `data/${n}`, content: files[n], mode: 0o644 })),
];

let img1: string;
let img2: string;
let img3: string;
let img4: string;
let img5: string;
let img6: string;

beforeAll(async () => {
  available = await gearDaemonAvailable();
  if (!available) return;
  work = mkdtempSync('/tmp/gear-lazy-it-');
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  bb = await busyboxLayer();
  img1 = await convert([withFiles(['a', 'b', 'unused'])], 'gear/img1:v1');
  img2 = await convert([withFiles(['a', 'c'])], 'gear/img2:v1');
  img3 = await convert([withFiles(['d'])], 'gear/img3:v1', 'auto');
  img4 = await convert([withFiles(['e', 'f', 'g', 'flip', 'down'])], 'gear/img4:v1');
  img5 = await convert([withFiles(['h', 'i', 'j'])], 'gear/img5:v1');
  img6 = await convert([withFiles(['k'])], 'gear/img6:v1');
  // A: default cache, a short fetch deadline (the registry-down test relies on it).
  A = await startDockerd({ driver: 'gear', gearArgs: ['--fetch-timeout', '6s'] });
  // B: a 1 MiB cache, smaller than busybox itself: everything is evicted soon after use.
  B = await startDockerd({ driver: 'gear', gearArgs: ['--cache-size', '1MiB', '--fetch-timeout', '20s'] });
}, 900_000);

afterAll(async () => {
  await A?.stop();
  await B?.stop();
  await proxy?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('lazy gear images on a gear dockerd', () => {
  it('pulls only the index, runs at once, and fetches only the files the container opens', async (ctx) => {
    if (!available) return ctx.skip();
    const d = A!;
    await d.dockerOk(['pull', img1]);
    expect(gets(files.a) + gets(files.b) + gets(files.unused)).toBe(0);
    const r = await d.dockerOk(['run', '--rm', img1, 'sh', '-c', 'md5sum /data/a | cut -c1-32; ls /bin | wc -l']);
    const [sum, count] = r.stdout.trim().split('\n');
    expect(sum).toBe(createHash('md5').update(files.a).digest('hex'));
    expect(Number(count)).toBeGreaterThan(50);
    expect(gets(files.a)).toBe(1);
    expect(gets(files.b)).toBe(0);
    expect(gets(files.unused)).toBe(0);
    expect(gets(bb.find((e) => e.path === 'bin/busybox')!.content!)).toBe(1);
    const st = await info(d);
    expect(Number(st['Fetched Files'])).toBeGreaterThanOrEqual(2);
    expect(Number(st['Fetched Files'])).toBeLessThanOrEqual(4); // busybox, a, and maybe /etc/passwd, /etc/group (runc reads them)
    expect(st['Lazy Pull']).toMatch(/^on/);
    // A second run reads from the pool.
    await d.dockerOk(['run', '--rm', img1, 'cat', '/data/a']);
    expect(gets(files.a)).toBe(1);
  });

  it('a second image sharing files fetches none of the shared ones', async (ctx) => {
    if (!available) return ctx.skip();
    const d = A!;
    await d.dockerOk(['pull', img2]);
    const r = await d.dockerOk(['run', '--rm', img2, 'sh', '-c', 'cat /data/a /data/c | md5sum | cut -c1-32']);
    expect(r.stdout.trim()).toBe(createHash('md5').update(Buffer.concat([files.a, files.c])).digest('hex'));
    expect(gets(files.a)).toBe(1);
    expect(gets(bb.find((e) => e.path === 'bin/busybox')!.content!)).toBe(1);
    expect(gets(files.c)).toBe(1);
  });

  it('docker save and docker push of a pulled Gear image reproduce the index layer digest', async (ctx) => {
    if (!available) return ctx.skip();
    const d = A!;
    const layers = JSON.parse((await d.dockerOk(['image', 'inspect', img1, '--format', '{{json .RootFS.Layers}}'])).stdout) as string[];
    expect(layers).toHaveLength(1);
    const out = join(work, 'saved');
    await runOk('mkdir', ['-p', out]);
    await d.dockerOk(['save', img1, '-o', join(out, 'img.tar')]);
    await runOk('tar', ['-xf', join(out, 'img.tar'), '-C', out]);
    const manifest = JSON.parse((await readAll(join(out, 'manifest.json'))).toString()) as { Layers: string[] }[];
    const layerTar = await readAll(join(out, manifest[0]!.Layers[0]!));
    expect(`sha256:${hex(layerTar)}`).toBe(layers[0]);
    // push to another repository (and another registry: no cross-repo mount shortcut)
    const reg2 = await startRegistry();
    try {
      const dst = `${reg2.host}/gear/copy:v1`;
      await d.dockerOk(['tag', img1, dst]);
      await d.dockerOk(['push', dst]);
      const m = await fetch(`${reg2.url}/v2/gear/copy/manifests/v1`, { headers: { accept: 'application/vnd.docker.distribution.manifest.v2+json' } });
      const doc = (await m.json()) as { layers: { digest: string }[] };
      const orig = await fetch(`${reg.url}/v2/gear/img1/manifests/v1`, {
        headers: { accept: 'application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' },
      });
      const origDoc = (await orig.json()) as { layers: { digest: string; mediaType: string }[] };
      // Docker may recompress; the uncompressed digest (diffID) is the identity: compare the pushed blob's content.
      const blob = Buffer.from(await (await fetch(`${reg2.url}/v2/gear/copy/blobs/${doc.layers[0]!.digest}`)).arrayBuffer());
      const { gunzipSync } = await import('node:zlib');
      const raw = blob[0] === 0x1f ? gunzipSync(blob) : blob;
      expect(`sha256:${hex(raw)}`).toBe(layers[0]);
      expect(origDoc.layers).toHaveLength(1);
    } finally {
      await reg2.stop();
    }
  });

  it('20 concurrent containers from one Gear image fetch each file once', async (ctx) => {
    if (!available) return ctx.skip();
    const d = A!;
    await d.dockerOk(['pull', img3]);
    const results = await Promise.all(
      Array.from({ length: 20 }, () => d.docker(['run', '--rm', img3, 'sh', '-c', 'md5sum /data/d | cut -c1-32'], { timeoutMs: 300_000 })),
    );
    for (const r of results) {
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout.trim()).toBe(createHash('md5').update(files.d).digest('hex'));
    }
    expect(gets(files.d)).toBeLessThanOrEqual(1); // stored gzip: the GET is of the compressed blob
    const st = await info(d);
    expect(st['Fetch Failures']).toMatch(/^0 /);
  });

  it('gear prefetch records a run from a node pool; a fresh node then fetches those files during the pull, and the run fetches nothing', async (ctx) => {
    if (!available) return ctx.skip();
    const nodes: Dockerd[] = [];
    try {
      // Record: a node whose pool starts empty runs the task once.
      const rec = await startDockerd({ driver: 'gear' });
      nodes.push(rec);
      await rec.dockerOk(['run', '--rm', img5, 'sh', '-c', 'cat /data/h /data/i >/dev/null']);
      expect(gets(files.h)).toBe(1);
      const fast = img5.replace(':v1', ':fast');
      const r = await runOk(process.execPath, [GEAR_CLI, 'prefetch', '--json', '--from-pool', join(rec.gearRoot!, 'pool'), img5, fast], { timeoutMs: 120_000 });
      const summary = JSON.parse(r.stdout) as { prefetch: number; files: number };
      expect(summary.prefetch).toBeGreaterThanOrEqual(3); // busybox, h, i (and what runc read)
      expect(summary.prefetch).toBeLessThan(summary.files);
      // A path that is not a file of the image is refused, naming it.
      const list = join(work, 'bad-list.txt');
      await import('node:fs/promises').then((f) => f.writeFile(list, '/data/h\n/etc/nope\n'));
      const bad = await run(process.execPath, [GEAR_CLI, 'prefetch', '--list', list, img5, img5.replace(':v1', ':bad')]);
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/"etc\/nope"/);

      // A fresh node: the pull starts the prefetch; the task then fetches nothing more.
      const node = await startDockerd({ driver: 'gear' });
      nodes.push(node);
      await node.dockerOk(['pull', fast]);
      let st: Record<string, string> = {};
      for (let i = 0; i < 100; i++) {
        st = await info(node);
        if (/^(\d+) of \1 listed files in the pool/.test(st['Prefetch'] ?? '')) break;
        await new Promise((res) => setTimeout(res, 100));
      }
      expect(st['Prefetch']).toMatch(/^(\d+) of \1 listed files in the pool \(1 index layers\)$/);
      expect(gets(files.h)).toBe(2);
      expect(gets(files.i)).toBe(2);
      const fetchedBefore = Number(st['Fetched Files']);
      const out = await node.dockerOk(['run', '--rm', fast, 'sh', '-c', 'cat /data/h /data/i | md5sum | cut -c1-32']);
      expect(out.stdout.trim()).toBe(createHash('md5').update(Buffer.concat([files.h, files.i])).digest('hex'));
      expect(Number((await info(node))['Fetched Files'])).toBe(fetchedBefore);
      expect(gets(files.h)).toBe(2);
      expect(gets(files.j)).toBe(0); // never opened, never listed, never fetched
    } finally {
      for (const n of nodes) await n.stop();
    }
  });

  it('a pool file altered on disk is found by gear cache verify (through the daemon), removed, and fetched again on the next read', async (ctx) => {
    if (!available) return ctx.skip();
    const d = A!;
    const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');
    await d.dockerOk(['pull', img6]);
    const first = await d.dockerOk(['run', '--rm', img6, 'sh', '-c', 'md5sum /data/k | cut -c1-32']);
    expect(first.stdout.trim()).toBe(md5(files.k));
    expect(gets(files.k)).toBe(1);
    // A bit flip at rest, in place (same inode): overlay serves it unchecked to the next container.
    const h = hex(files.k);
    const poolFile = join(d.gearRoot!, 'pool', 'sha256', h.slice(0, 2), h);
    const { readFile, writeFile } = await import('node:fs/promises');
    const bad = await readFile(poolFile);
    bad[123_456] ^= 0x20;
    await writeFile(poolFile, bad);
    const served = await d.dockerOk(['run', '--rm', img6, 'sh', '-c', 'md5sum /data/k | cut -c1-32']);
    expect(served.stdout.trim()).toBe(md5(bad));
    // The scrub, asked of the running daemon: exit code 1, the file named, removed.
    const v = await run(process.execPath, [GEAR_CLI, 'cache', 'verify', '--root', d.gearRoot!, '--json'], { timeoutMs: 120_000 });
    expect(v.code, v.stderr).toBe(1);
    const rep = JSON.parse(v.stdout) as { by: string; bad: number; removed: number; badFiles: { digest: string; actual: string; removed: boolean }[] };
    expect(rep.by).toBe('daemon');
    expect(rep.bad).toBe(1);
    expect(rep.removed).toBe(1);
    expect(rep.badFiles[0]).toMatchObject({ digest: `sha256:${h}`, actual: `sha256:${hex(bad)}`, removed: true });
    expect(existsSync(poolFile)).toBe(false);
    // The next container falls through to the miss filesystem: fetched again, verified, right bytes.
    const after = await d.dockerOk(['run', '--rm', img6, 'sh', '-c', 'md5sum /data/k | cut -c1-32']);
    expect(after.stdout.trim()).toBe(md5(files.k));
    expect(gets(files.k)).toBe(2);
    expect(hex(await readFile(poolFile))).toBe(h);
    // docker info says which protection is active.
    const st = await info(d);
    expect(st['Pool Integrity']).toMatch(/^scrub every 24h at 50\.0MiB\/s \(fs-verity: (not )?supported/);
    expect(st['Pool Scrub']).toMatch(/: \d+ files, .* 1 bad, 1 removed; since first run: 1 bad, 1 removed/);
    // A clean pool: exit code 0.
    const v2 = await run(process.execPath, [GEAR_CLI, 'cache', 'verify', '--root', d.gearRoot!], { timeoutMs: 120_000 });
    expect(v2.code, v2.stderr).toBe(0);
    expect(v2.stdout).toMatch(/verified \d+ files, .*\(by the running daemon, at most 50\.0 MiB\/s\): 0 bad, 0 removed/);
  });

  it('a 1 MiB cache evicts while containers keep working', async (ctx) => {
    if (!available) return ctx.skip();
    const d = B!;
    await d.dockerOk(['pull', img4]);
    for (const n of ['e', 'f', 'g', 'e'] as const) {
      const r = await d.dockerOk(['run', '--rm', img4, 'sh', '-c', `md5sum /data/${n} | cut -c1-32`]);
      expect(r.stdout.trim()).toBe(createHash('md5').update(files[n]).digest('hex'));
    }
    const st = await info(d);
    expect(st['Pool Evictions']).not.toMatch(/^0 files/);
    expect(st['Pool']).toMatch(/of 1\.0 ?MiB|of 1 ?MiB/);
  });

  it('registry down: cached files still read, an uncached read fails with EIO within the deadline', async (ctx) => {
    if (!available) return ctx.skip();
    const d = A!;
    await d.dockerOk(['pull', img4]);
    // Start a long-running container, cache a small file in it.
    const id = (await d.dockerOk(['run', '-d', img4, 'sleep', '600'])).stdout.trim();
    try {
      await d.dockerOk(['exec', id, 'cat', '/etc/passwd']);
      proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'reset' } : undefined));
      const cached = await d.docker(['exec', id, 'cat', '/etc/passwd']);
      expect(cached.code).toBe(0);
      const t0 = Date.now();
      const r = await d.docker(['exec', id, 'cat', '/data/down'], { timeoutMs: 60_000 });
      const took = Date.now() - t0;
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Input\/output error/i);
      expect(took).toBeLessThan(15_000);
      // Byte-flipping registry: rejected, never in the pool, EIO.
      proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'flip' } : undefined));
      const f = await d.docker(['exec', id, 'cat', '/data/flip'], { timeoutMs: 60_000 });
      expect(f.code).not.toBe(0);
      expect(f.stderr).toMatch(/Input\/output error/i);
      const h = hex(files.flip);
      expect(existsSync(join(d.gearRoot!, 'pool', 'sha256', h.slice(0, 2), h))).toBe(false);
      expect((await info(d))['Fetch Failures']).toMatch(/[1-9][0-9]* rejected/);
      // Healthy again: the same file reads.
      proxy.setDecider(() => undefined);
      const ok = await d.dockerOk(['exec', id, 'sh', '-c', 'md5sum /data/flip | cut -c1-32']);
      expect(ok.stdout.trim()).toBe(createHash('md5').update(files.flip).digest('hex'));
    } finally {
      proxy.setDecider(() => undefined);
      await d.docker(['rm', '-f', id]);
    }
  });

  it('minbase (debootstrap) image runs lazily', async (ctx) => {
    if (!available) return ctx.skip();
    const tarPath = await ensureMinbaseTar();
    const d = A!;
    const ref = await convert([await readAll(tarPath)], 'gear/minbase:v1', 'auto');
    await d.dockerOk(['pull', ref]);
    const before = Number((await info(d))['Fetched Files']);
    const r = await d.dockerOk(['run', '--rm', ref, 'sh', '-c', 'cat /etc/os-release; dpkg -l | head -8; ls /usr/bin | wc -l']);
    expect(r.stdout).toMatch(/Debian/);
    expect(r.stdout).toMatch(/ii {2}/);
    const fetched = Number((await info(d))['Fetched Files']) - before;
    const listed = Number((await d.dockerOk(['run', '--rm', ref, 'sh', '-c', 'find / -xdev -type f -size +0 | wc -l'])).stdout.trim());
    expect(fetched).toBeGreaterThan(0);
    expect(fetched).toBeLessThan(listed / 4);
  });
});
