/**
 * `gear convert` against a real registry (Debian docker-registry 2.8), with
 * source images written by the tests (OCI layouts, docker-archive tars).
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, createReadStream } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runConvert } from '../../src/cli/convert.js';
import { isClass } from '../../src/core/errors.js';
import { readIndexLayer } from '../../src/core/index/index-layer.js';
import { GearMediaType, SOURCE_DIGEST_LABEL, GEAR_VERSION_LABEL, type IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { convertImage } from '../../src/convert/convert.js';
import { registryDestination, ociLayoutDestination, type Destination } from '../../src/convert/destination.js';
import { newRegistryClient, openRegistry } from '../../src/convert/registry-adapter.js';
import { layerTar as layerTarOf, openDockerDaemon, openOciLayout } from '../../src/convert/source.js';
import {
  busyboxLayer,
  expectedFiles,
  multiLayerImage,
  sha256,
  writeDockerArchive,
  writeOciImage,
  type LayerEntry,
} from '../helpers/oci-images.js';
import { ensureMinbaseTar } from '../helpers/images.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const exec = promisify(execFile);
const GEAR_CLI_PATH = join(import.meta.dirname, '../../dist/cli/gear.js');
// Format version 2 (one blob per file): what these tests check; version 3 is test/integration/convert-v3.test.ts.
const flags = { concurrency: '4', filesPerManifest: '10000', insecureRegistry: [] as string[], progress: false, json: true, formatVersion: '2' };

let reg: TestRegistry;
let work: string;

beforeAll(async () => {
  reg = await startRegistry();
  work = mkdtempSync('/tmp/gear-convert-test-');
});

afterAll(async () => {
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

async function getJson(url: string, accept?: string): Promise<{ status: number; body: any; bytes: Buffer }> {
  const res = await fetch(url, { headers: accept ? { accept } : {} });
  const bytes = Buffer.from(await res.arrayBuffer());
  let body: unknown;
  try {
    body = JSON.parse(bytes.toString('utf8'));
  } catch {
    body = undefined;
  }
  return { status: res.status, body, bytes };
}

const ACCEPT = 'application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json';

async function blob(repo: string, digest: string): Promise<Buffer> {
  const res = await fetch(`${reg.url}/v2/${repo}/blobs/${digest}`);
  expect(res.status, `blob ${digest}`).toBe(200);
  return Buffer.from(await res.arrayBuffer());
}

/** Pulls a Gear image from the test registry: manifest, config, parsed index layer. */
async function pullGear(repo: string, tag: string): Promise<{ manifest: any; config: any; index: { manifest: IndexManifest; entries: TarHeader[] } }> {
  const m = await getJson(`${reg.url}/v2/${repo}/manifests/${tag}`, ACCEPT);
  expect(m.status).toBe(200);
  expect(m.body.layers).toHaveLength(1);
  const config = JSON.parse((await blob(repo, m.body.config.digest)).toString('utf8'));
  const layer = gunzipSync(await blob(repo, m.body.layers[0].digest));
  expect(sha256(layer)).toBe(config.rootfs.diff_ids[0]);
  const index = await readIndexLayer((async function* () { yield layer; })());
  return { manifest: m.body, config, index };
}

/** The content of a Gear file fetched from the registry as the index says it is stored. */
async function gearFile(repo: string, f: IndexManifest['files'][number]): Promise<Buffer> {
  if (f.blob) {
    expect(f.blob.mediaType).toBe(GearMediaType.FileGzip);
    const b = await blob(repo, f.blob.digest);
    expect(sha256(b)).toBe(f.blob.digest);
    return gunzipSync(b);
  }
  return blob(repo, f.digest);
}

async function expectServesFiles(repo: string, index: IndexManifest, expected: Map<string, Buffer>): Promise<void> {
  const nonEmpty = [...expected].filter(([, b]) => b.length > 0);
  const byPath = new Map(index.files.map((f) => [f.path, f]));
  // Every non-empty regular file is either listed or a hard link to a listed one; check listed ones by content.
  for (const [path, content] of nonEmpty) {
    const f = byPath.get(path);
    if (!f) continue;
    expect(f.size, path).toBe(content.length);
    expect(f.digest, path).toBe(sha256(content));
    const got = await gearFile(repo, f);
    expect(got.equals(content), `content of ${path}`).toBe(true);
  }
  for (const f of index.files) expect(expected.has(f.path), `unexpected file ${f.path}`).toBe(true);
}

async function expectNoManifest(repo: string, tag: string): Promise<void> {
  const m = await getJson(`${reg.url}/v2/${repo}/manifests/${tag}`, ACCEPT);
  expect(m.status).toBe(404);
}

async function thrown(p: Promise<unknown>): Promise<Error> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'expected the conversion to fail').toBeInstanceOf(Error);
  return err as Error;
}

describe('gear convert', () => {
  it('converts a busybox-static image from an OCI layout; every file is served by its blob', async () => {
    const layer = await busyboxLayer();
    const src = join(work, 'busybox-oci');
    const srcDigest = await writeOciImage(src, [layer], { tag: 'v1' });
    const s = await runConvert(`oci:${src}:v1`, `${reg.host}/gear/busybox:v1`, flags);
    expect(s.files).toBe(3); // busybox, passwd, group (etc/empty is empty)
    expect(s.blobsUploaded).toBeGreaterThanOrEqual(3);
    const { config, index } = await pullGear('gear/busybox', 'v1');
    expect(config.config.Labels[GEAR_VERSION_LABEL]).toBe('2');
    expect(index.manifest.version).toBe(2);
    expect(config.config.Labels[SOURCE_DIGEST_LABEL]).toBe(srcDigest);
    expect(config.config.Cmd).toEqual(['/bin/sh']);
    expect(index.manifest.location).toEqual({ registry: reg.host, repository: 'gear/busybox' });
    await expectServesFiles('gear/busybox', index.manifest, expectedFiles([layer]));
    const symlinks = index.entries.filter((e) => e.type === 'symlink');
    expect(symlinks.length).toBeGreaterThan(50);
    expect(symlinks.every((e) => e.linkname === '/bin/busybox')).toBe(true);
    expect(index.entries.find((e) => e.path === 'etc/empty')?.type).toBe('file');
    // busybox compresses well: stored gzipped
    expect(index.manifest.files.find((f) => f.path === 'bin/busybox')?.blob?.mediaType).toBe(GearMediaType.FileGzip);

    // --format-version 1, for nodes whose gear reads only version 1: the same tree as tar entries.
    await runConvert(`oci:${src}:v1`, `${reg.host}/gear/busybox:format1`, { ...flags, formatVersion: '1' });
    const v1 = await pullGear('gear/busybox', 'format1');
    expect(v1.config.config.Labels[GEAR_VERSION_LABEL]).toBe('1');
    expect(v1.index.manifest.version).toBe(1);
    expect(v1.index.manifest.files).toEqual(index.manifest.files);
    expect(v1.index.entries.map((e) => ({ ...e, path: e.path.replace(/\/$/, '') }))).toEqual(index.entries);
    expect(v1.config.rootfs.diff_ids[0]).not.toBe(config.rootfs.diff_ids[0]);
  });

  it('stores big files raw (range-readable) even when gzip would shrink them; --raw-above off gzips them', async () => {
    const bigText = Buffer.from('compressible big file line\n'.repeat(400_000)); // ~10.8 MB, gzips to ~1%
    const layer: LayerEntry[] = [
      { path: 'data/', type: 'dir' },
      { path: 'data/big.txt', content: bigText },
      { path: 'data/small.txt', content: 'small and compressible '.repeat(100) },
    ];
    const src = join(work, 'big-oci');
    await writeOciImage(src, [layer], { tag: 'v1' });
    await runConvert(`oci:${src}:v1`, `${reg.host}/gear/big:v1`, flags);
    const { index } = await pullGear('gear/big', 'v1');
    const byPath = new Map(index.manifest.files.map((f) => [f.path, f]));
    expect(byPath.get('data/big.txt')?.blob).toBeUndefined();
    expect(byPath.get('data/small.txt')?.blob?.mediaType).toBe(GearMediaType.FileGzip);
    await expectServesFiles('gear/big', index.manifest, expectedFiles([layer]));
    await runConvert(`oci:${src}:v1`, `${reg.host}/gear/big:gz`, { ...flags, rawAbove: 'off' });
    const gz = await pullGear('gear/big', 'gz');
    expect(gz.index.manifest.files.find((f) => f.path === 'data/big.txt')?.blob?.mediaType).toBe(GearMediaType.FileGzip);
  });

  it('flattens a multi-layer docker-archive: whiteouts, opaque dirs, hard links across layers, xattrs', async () => {
    const layers = multiLayerImage();
    const file = join(work, 'multi.tar');
    await writeDockerArchive(file, layers);
    const s = await runConvert(`docker-archive:${file}`, `${reg.host}/gear/multi:v1`, flags);
    const { index } = await pullGear('gear/multi', 'v1');
    const expected = expectedFiles(layers);
    await expectServesFiles('gear/multi', index.manifest, expected);
    const paths = index.entries.map((e) => e.path.replace(/\/$/, ''));
    expect(paths).not.toContain('usr/lib/gone');
    expect(paths).not.toContain('usr/lib/gone-dir');
    expect(paths).not.toContain('usr/lib/gone-dir/inner');
    expect(paths).not.toContain('opt/app/old-1');
    expect(paths).toContain('opt/app/new');
    expect(paths.some((p) => p.includes('.wh.'))).toBe(false);
    const byPath = new Map(index.entries.map((e) => [e.path.replace(/\/$/, ''), e]));
    // libfoo.so is a hard link to the *old* libfoo.so.1 content, which layer 3 replaced: two inodes now.
    const files = new Map(index.manifest.files.map((f) => [f.path, f]));
    expect(files.get('usr/lib/libfoo.so')?.size).toBe(200_000);
    expect(files.get('usr/lib/libfoo.so.1')?.size).toBe(100_000);
    // tool-hardlink and tool share an inode: one file entry, one link entry
    expect(byPath.get('usr/bin/tool-hardlink')).toMatchObject({ type: 'link', linkname: 'usr/bin/tool' });
    expect(files.has('usr/bin/tool-hardlink')).toBe(false);
    // identical content at two paths: one blob
    expect(files.get('usr/bin/tool-copy')?.digest).toBe(files.get('usr/bin/tool')?.digest);
    expect(byPath.get('etc/cap-file')?.xattrs.get('user.gear-test')?.toString()).toBe('hello');
    expect(byPath.get('etc/cap-file')?.xattrs.has('trusted.overlay.redirect')).toBe(false);
    expect(byPath.get('var/fifo')?.type).toBe('fifo');
    expect(byPath.get('var/empty')).toMatchObject({ type: 'file', size: 0 });
    expect(files.has('var/empty')).toBe(false);
    expect(s.uniqueContents).toBe(new Set(index.manifest.files.map((f) => f.digest)).size);
  });

  it('is deterministic, and a second conversion uploads no Gear file again', async () => {
    const src = join(work, 'det-oci');
    await writeOciImage(src, multiLayerImage());
    const a = await runConvert(`oci:${src}`, `${reg.host}/gear/det:a`, flags);
    const b = await runConvert(`oci:${src}`, `${reg.host}/gear/det:b`, flags);
    expect(b.manifestDigest).toBe(a.manifestDigest);
    expect(b.indexDigest).toBe(a.indexDigest);
    expect(b.bytesUploaded).toBe(0);
    expect(b.bytesSkipped).toBeGreaterThan(0);
    // the same source as docker-archive or OCI layout gives the same index layer (only the source label differs)
    const file = join(work, 'det.tar');
    await writeDockerArchive(file, multiLayerImage());
    const c = await runConvert(`docker-archive:${file}`, `${reg.host}/gear/det:c`, flags);
    expect(c.indexDiffId).toBe(a.indexDiffId);
  });

  it('uploads files shared by two images once', async () => {
    const base = multiLayerImage();
    const extra: LayerEntry[] = [{ path: 'srv/', type: 'dir' }, { path: 'srv/data.bin', content: Buffer.alloc(50_000, 3) }];
    const srcA = join(work, 'share-a');
    const srcB = join(work, 'share-b');
    await writeOciImage(srcA, base);
    await writeOciImage(srcB, [...base, extra]);
    const a = await runConvert(`oci:${srcA}`, `${reg.host}/gear/share:a`, flags);
    const b = await runConvert(`oci:${srcB}`, `${reg.host}/gear/share:b`, flags);
    expect(a.blobsUploaded).toBeGreaterThan(0);
    // B uploads only its own file (plus its index layer and config); every shared file is skipped
    const { index } = await pullGear('gear/share', 'b');
    const shared = index.manifest.files.filter((f) => f.path !== 'srv/data.bin');
    expect(b.blobsSkipped).toBeGreaterThanOrEqual(new Set(shared.map((f) => f.digest)).size);
    expect(b.bytesUploaded).toBeLessThan(50_000 + b.indexSize + 10_000);
  });

  it("keeps every Gear file of a tagged image through the registry's garbage collection", async () => {
    const src = join(work, 'gc-oci');
    const layers = [await busyboxLayer(), ...multiLayerImage()];
    await writeOciImage(src, layers);
    // Many small keep-alive manifests, to exercise the split.
    await runConvert(`oci:${src}`, `${reg.host}/gear/gc:v1`, { ...flags, filesPerManifest: '3' });
    const { index } = await pullGear('gear/gc', 'v1');
    const blobDigests = index.manifest.files.map((f) => f.blob?.digest ?? f.digest);
    const image = await getJson(`${reg.url}/v2/gear/gc/manifests/v1`, ACCEPT);
    const ref = await getJson(`${reg.url}/v2/gear/gc/manifests/sha256-${sha256(image.bytes).slice(7)}`, ACCEPT);
    expect(ref.status).toBe(200);
    expect(ref.body.manifests.length).toBe(Math.ceil(new Set(blobDigests).size / 3));

    // Stop the registry (by its PID), collect with --delete-untagged (the strictest mode), check the storage.
    // An unrelated untagged image's blobs must go, to show the collector did run.
    const orphan = join(work, 'gc-orphan');
    await writeOciImage(orphan, [[{ path: 'orphan', content: 'only referenced by an untagged manifest' }]]);
    const o = await runConvert(`oci:${orphan}`, `${reg.host}/gear/gc:orphan`, flags);
    const del = await fetch(`${reg.url}/v2/gear/gc/manifests/${o.manifestDigest}`, { method: 'DELETE' });
    expect(del.status).toBe(202);
    try {
      process.kill(reg.pid, 'SIGTERM');
      for (let i = 0; i < 100 && pidAlive(reg.pid); i++) await new Promise((r) => setTimeout(r, 100));
      const gc = await exec('/usr/bin/docker-registry', ['garbage-collect', '--delete-untagged', join(reg.root, 'config.yml')], { maxBuffer: 64 << 20 });
      expect(gc.stdout + gc.stderr).toMatch(/blobs marked/);
      const blobPath = (d: string) => join(reg.root, 'data/docker/registry/v2/blobs/sha256', d.slice(7, 9), d.slice(7), 'data');
      const missing = [...new Set(blobDigests)].filter((d) => !existsSync(blobPath(d)));
      expect(missing).toEqual([]);
      expect(existsSync(blobPath(o.indexDigest)), 'the orphan index layer was collected').toBe(false);
    } finally {
      // a fresh registry for the remaining tests
      await reg.stop();
      reg = await startRegistry();
    }
  });

  it('after an interrupted conversion, a rerun uploads only what is missing and no manifest ever points at missing blobs', async () => {
    const src = join(work, 'interrupt-oci');
    const layers = [await busyboxLayer(), ...multiLayerImage()];
    await writeOciImage(src, layers);
    const client = newRegistryClient();
    try {
      const real = registryDestination(openRegistry(`${reg.host}/gear/interrupt:v1`, client));
      let pushes = 0;
      const failing: Destination = {
        ...real,
        pushFile: async (d, s, p) => {
          if (++pushes > 3) throw new Error('simulated crash');
          return real.pushFile(d, s, p);
        },
        close: async () => undefined,
      };
      const err = await thrown(convertImage(await openOciLayout(src), failing, { concurrency: 1, formatVersion: 2 }));
      expect(err.message).toMatch(/simulated crash/);
      await expectNoManifest('gear/interrupt', 'v1');
      const s = await convertImage(await openOciLayout(src), real, { concurrency: 2, formatVersion: 2 });
      expect(s.blobsSkipped).toBe(3);
      const { index } = await pullGear('gear/interrupt', 'v1');
      await expectServesFiles('gear/interrupt', index.manifest, expectedFiles(layers));
    } finally {
      await client.close();
    }
  });

  describe('bad input', () => {
    it('a source blob whose content does not match its digest', async () => {
      const src = join(work, 'corrupt-oci');
      await writeOciImage(src, multiLayerImage(), {
        corruptLayer: (i, b) => {
          if (i !== 1) return b;
          const c = Buffer.from(b);
          c[c.length - 9] ^= 0xff; // inside the gzip trailer CRC: decompression may still "work"
          return c;
        },
      });
      const err = await thrown(runConvert(`oci:${src}`, `${reg.host}/gear/corrupt:v1`, flags));
      expect(err.message).toMatch(/does not match its digest|crc|incorrect/i);
      expect(err.message).toMatch(/layer 2\/3/);
      await expectNoManifest('gear/corrupt', 'v1');
    });

    it('a truncated layer', async () => {
      const layers = multiLayerImage();
      const file = join(work, 'truncated.tar');
      // docker-archive with a layer tar cut in the middle of a file body (and the diff_id of the full tar)
      const { layerTar } = await import('../helpers/oci-images.js');
      const full = await layerTar(layers[0]!);
      await writeDockerArchive(file, [full.subarray(0, 30_000), ...layers.slice(1)]);
      const err = await thrown(runConvert(`docker-archive:${file}`, `${reg.host}/gear/trunc:v1`, flags));
      expect(err.message).toMatch(/truncated/);
      await expectNoManifest('gear/trunc', 'v1');
      // OCI layout: gzip blob cut short (its descriptor keeps the full size)
      const src = join(work, 'truncated-oci');
      await writeOciImage(src, layers, { corruptLayer: (i, b) => (i === 0 ? b.subarray(0, b.length >> 1) : b) });
      const err2 = await thrown(runConvert(`oci:${src}`, `${reg.host}/gear/trunc:v1`, flags));
      expect(err2.message).toMatch(/truncated|unexpected end|declared/);
      await expectNoManifest('gear/trunc', 'v1');
    });

    it('a layer with path traversal', async () => {
      for (const bad of ['../escape', 'etc/../../escape', 'a/../../../etc/passwd']) {
        const src = join(work, `traversal-${sha256(bad).slice(7, 15)}`);
        await writeOciImage(src, [[{ path: 'etc/', type: 'dir' }, { path: bad, content: 'x' }]]);
        const err = await thrown(runConvert(`oci:${src}`, `${reg.host}/gear/evil:v1`, flags));
        expect(err.message).toMatch(/path traversal/);
        expect(isClass(err, 'InvalidArgument')).toBe(true);
      }
      const src = join(work, 'traversal-link');
      await writeOciImage(src, [[{ path: 'etc/', type: 'dir' }, { path: 'etc/x', type: 'link', linkname: '../../etc/shadow' }]]);
      expect((await thrown(runConvert(`oci:${src}`, `${reg.host}/gear/evil:v1`, flags))).message).toMatch(/path traversal/);
      const gear = join(work, 'reserved');
      await writeOciImage(gear, [[{ path: '.gear/index.json', content: '{}' }]]);
      expect((await thrown(runConvert(`oci:${gear}`, `${reg.host}/gear/evil:v1`, flags))).message).toMatch(/reserved/);
      await expectNoManifest('gear/evil', 'v1');
    });

    it('an unreachable registry', async () => {
      const src = join(work, 'unreach-oci');
      await writeOciImage(src, [await busyboxLayer()]);
      const client = newRegistryClient({ retry: { maxAttempts: 2, minDelayMs: 10, maxDelayMs: 50, maxTotalMs: 2000 }, connectTimeoutMs: 2000 });
      try {
        const dst = registryDestination(openRegistry('127.0.0.1:1/gear/x:v1', client));
        const t0 = Date.now();
        const err = await thrown(convertImage(await openOciLayout(src), dst, { formatVersion: 2 }));
        expect(isClass(err, 'Unavailable') || isClass(err, 'DeadlineExceeded'), String(err)).toBe(true);
        expect(err.message).toMatch(/127\.0\.0\.1:1/);
        expect(Date.now() - t0).toBeLessThan(30_000);
      } finally {
        await client.close();
      }
    });

    it('a registry that answers 401 and no credentials', async () => {
      const locked = await startRegistry({ htpasswd: true });
      try {
        const src = join(work, 'auth-oci');
        await writeOciImage(src, [await busyboxLayer()]);
        const err = await thrown(runConvert(`oci:${src}`, `${locked.host}/gear/locked:v1`, flags));
        expect(isClass(err, 'PermissionDenied'), String(err)).toBe(true);
        expect(err.message).toMatch(new RegExp(locked.host.replace(/\./g, '\\.')));
        const res = await fetch(`${locked.url}/v2/gear/locked/manifests/v1`, {
          headers: { authorization: `Basic ${Buffer.from(`${locked.credentials!.username}:${locked.credentials!.password}`).toString('base64')}` },
        });
        expect(res.status).toBe(404);
      } finally {
        await locked.stop();
      }
    });
  });

  it('reads an image from the Docker Engine API (docker-daemon:) over a unix socket', async () => {
    const archive = join(work, 'daemon.tar');
    const layers = multiLayerImage();
    await writeDockerArchive(archive, layers, 'gear-test/daemon:latest');
    const sock = join(work, 'docker.sock');
    const requests: string[] = [];
    const server: Server = createServer((req, res) => {
      requests.push(req.url ?? '');
      if (req.url === `/images/${encodeURIComponent('gear-test/daemon:latest')}/get`) {
        res.writeHead(200, { 'content-type': 'application/x-tar' });
        createReadStream(archive).pipe(res);
      } else {
        res.writeHead(404, { 'content-type': 'application/json' });
        res.end('{"message":"reference does not exist"}');
      }
    });
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      const s = await runConvert('docker-daemon:gear-test/daemon:latest', `${reg.host}/gear/daemon:v1`, { ...flags, dockerHost: `unix://${sock}` });
      const { index } = await pullGear('gear/daemon', 'v1');
      await expectServesFiles('gear/daemon', index.manifest, expectedFiles(layers));
      expect(s.files).toBe(index.manifest.files.length);
      const err = await thrown(openDockerDaemon('nope:latest', `unix://${sock}`));
      expect(isClass(err, 'NotFound')).toBe(true);
      const err2 = await thrown(openDockerDaemon('x', `unix://${join(work, 'no.sock')}`));
      expect(err2.message).toMatch(/cannot reach the Docker daemon/);
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
  });

  it('reads its source from a registry (pushed there with skopeo) and verifies it', async () => {
    const src = join(work, 'regsrc-oci');
    const layers = multiLayerImage();
    await writeOciImage(src, layers, { tag: 'v1' });
    await exec('skopeo', ['copy', '-q', '--dest-tls-verify=false', `oci:${src}:v1`, `docker://${reg.host}/src/multi:v1`]);
    const s = await runConvert(`${reg.host}/src/multi:v1`, `${reg.host}/gear/fromreg:v1`, flags);
    const { index, config } = await pullGear('gear/fromreg', 'v1');
    await expectServesFiles('gear/fromreg', index.manifest, expectedFiles(layers));
    const srcManifest = await getJson(`${reg.url}/v2/src/multi/manifests/v1`, ACCEPT + ',application/vnd.docker.distribution.manifest.v2+json');
    expect(config.config.Labels[SOURCE_DIGEST_LABEL]).toBe(sha256(srcManifest.bytes));
    expect(s.files).toBe(index.manifest.files.length);
    const missing = await thrown(runConvert(`${reg.host}/src/nope:v1`, `${reg.host}/gear/fromreg:v2`, flags));
    expect(isClass(missing, 'NotFound'), String(missing)).toBe(true);
  });

  it('writes an OCI layout destination with the same index as the registry would hold', async () => {
    const src = join(work, 'ocidst-src');
    await writeOciImage(src, multiLayerImage());
    const out = join(work, 'ocidst-out');
    const s = await runConvert(`oci:${src}`, `oci:${out}:gear`, { ...flags, location: `${reg.host}/gear/det` });
    const again = await convertImage(await openOciLayout(src), await ociLayoutDestination(`${out}:gear`, { registry: reg.host, repository: 'gear/det' }), { formatVersion: 2 });
    expect(again.manifestDigest).toBe(s.manifestDigest);
    expect(again.bytesUploaded).toBe(0);
    const back = await openOciLayout(`${out}:gear`);
    expect(back.sourceDigest).toBe(s.manifestDigest);
    expect(JSON.parse(readFileSync(join(out, 'index.json'), 'utf8')).manifests.length).toBe(3); // image, keep-alive, referrers
  });

  it('converts the cached debootstrap minbase rootfs plus an extra layer', async () => {
    // Builds the cache on a fresh machine (the first integration file to need it does).
    const tar = await ensureMinbaseTar();
    const extra: LayerEntry[] = [
      { path: 'etc/', type: 'dir' },
      { path: 'etc/.wh.motd', content: '' },
      { path: 'etc/gear-extra.conf', content: 'extra=1\n' },
    ];
    const src = join(work, 'minbase-oci');
    await writeOciImage(src, [readFileSync(tar), extra]);
    const s = await runConvert(`oci:${src}`, `${reg.host}/gear/minbase:v1`, flags);
    expect(s.files).toBeGreaterThan(1000);
    const { index } = await pullGear('gear/minbase', 'v1');
    // spot-check: every file's blob digest resolves, and a sample of contents match the source tar
    const { readTar } = await import('../../src/core/index/tar.js');
    const files = new Map(index.manifest.files.map((f) => [f.path, f]));
    let checked = 0;
    for await (const e of readTar((async function* () { yield readFileSync(tar); })())) {
      const p = e.header.path.replace(/^\.\//, '').replace(/\/$/, '');
      const f = files.get(p);
      if (!f || e.header.type !== 'file') continue;
      const chunks: Buffer[] = [];
      for await (const c of e.body()) chunks.push(c);
      const content = Buffer.concat(chunks);
      expect(f.digest, p).toBe(sha256(content));
      if (checked++ % 10 === 0) expect((await gearFile('gear/minbase', f)).equals(content), p).toBe(true);
    }
    expect(checked).toBeGreaterThan(1000);
    expect(index.entries.some((e) => e.path === 'etc/motd')).toBe(false);
  });
});

describe('gear convert staging folder', () => {
  /**
   * A source of many small files in the registry, read through a proxy that
   * throttles blob downloads: a conversion from it is reliably mid-way when
   * the test kills it, however loaded the machine is.
   */
  let src: string;
  let slow: FaultProxy;
  const stages = (dir: string) => readdirSync(dir).filter((n) => n.startsWith('gear-convert-'));
  const entriesIn = (dir: string) => {
    try {
      return readdirSync(dir).length;
    } catch {
      return 0;
    }
  };
  beforeAll(async () => {
    const tar = join(work, 'many-files.tar');
    const files: LayerEntry[] = [{ path: 'many/', type: 'dir' }];
    for (let i = 0; i < 1500; i++) files.push({ path: `many/f${i}`, content: Buffer.concat([randomBytes(4000), Buffer.alloc(8000, i % 251)]) });
    await writeDockerArchive(tar, [files], 'gear-test/many:1');
    await exec('skopeo', ['copy', '-q', '--dest-tls-verify=false', `docker-archive:${tar}`, `docker://${reg.host}/src/many:1`]);
    slow = await startFaultProxy(reg.url, (req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'throttle', bytesPerSecond: 400_000 } : undefined));
    src = `${reg.host}/src/many:1`;
  }, 120_000);
  afterAll(async () => {
    await slow?.stop();
  });

  /** Starts `gear convert` of the many-files image (throttled) with --tmp-dir tmp; resolves once its stage holds ≥ 100 entries. */
  async function startConvert(tmp: string, out: string): Promise<ChildProcess> {
    const child = spawn(process.execPath, [GEAR_CLI_PATH, 'convert', '--no-progress', '--json', '--format-version', '2', '--tmp-dir', tmp, `${slow.host}/src/many:1`, `oci:${out}:v1`], { stdio: ['ignore', 'pipe', 'pipe'] });
    const deadline = Date.now() + 60_000;
    while (Date.now() < deadline && child.exitCode === null) {
      const st = stages(tmp);
      if (st.length === 1 && entriesIn(join(tmp, st[0]!)) >= 100) return child;
      await new Promise((r) => setTimeout(r, 10));
    }
    child.kill('SIGKILL');
    throw new Error(`the conversion ${child.exitCode === null ? 'staged too little in 60 s' : `ended (code ${child.exitCode}) before it staged 100 contents`}`);
  }
  const exited = (c: ChildProcess) => new Promise<number | null>((r) => (c.exitCode !== null || c.signalCode !== null ? r(c.exitCode) : c.once('exit', (code) => r(code))));

  it('a conversion killed with -9 leaves its stage; the rerun reuses it, completes, and leaves no staging folder', async () => {
    const tmp = mkdtempSync(join(work, 'tmp-kill-'));
    const out = join(work, 'kill-out');
    const child = await startConvert(tmp, out);
    child.kill('SIGKILL');
    await exited(child);
    expect(stages(tmp)).toHaveLength(1); // what kill -9 leaves
    // The rerun reads the same image straight from the registry: same source digest, same stage.
    const r = await exec(process.execPath, [GEAR_CLI_PATH, 'convert', '--no-progress', '--json', '--format-version', '2', '--tmp-dir', tmp, src, `oci:${out}:v1`], { maxBuffer: 16 << 20 });
    const s = JSON.parse(r.stdout) as { files: number; resumedContents: number; manifestDigest: string };
    expect(s.files).toBe(1500);
    expect(readdirSync(tmp)).toEqual([]);
    expect(s.resumedContents).toBeGreaterThan(0);
    // The reused stage gives the image every file, as written by the dead run or this one.
    const layout = await openOciLayout(`${out}:v1`);
    const { manifest } = await readIndexLayer(layerTarOf(layout.layers[0]!));
    expect(manifest.files).toHaveLength(1500);
    for (const f of manifest.files.slice(0, 1500)) {
      const b = readFileSync(join(out, 'blobs', 'sha256', (f.blob?.digest ?? f.digest).slice(7)));
      expect(sha256(f.blob ? gunzipSync(b) : b), f.path).toBe(f.digest);
    }
  }, 240_000);

  it('SIGTERM and SIGINT remove the stage; stale stages of dead runs are swept', async () => {
    for (const sig of ['SIGTERM', 'SIGINT'] as const) {
      const tmp = mkdtempSync(join(work, `tmp-${sig}-`));
      const child = await startConvert(tmp, join(work, `sig-out-${sig}`));
      let stderr = '';
      child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
      child.kill(sig);
      const code = await exited(child);
      expect(code, stderr).toBe(sig === 'SIGTERM' ? 143 : 130);
      expect(readdirSync(tmp), stderr).toEqual([]);
    }
    // A stage another source's killed run left (dead owner) goes at the next conversion.
    const tmp = mkdtempSync(join(work, 'tmp-stale-'));
    const stale = join(tmp, `gear-convert-${'ab'.repeat(32)}`);
    mkdirSync(stale, { mode: 0o700 });
    writeFileSync(join(stale, 'x'), 'left');
    const dead = spawn('true');
    await exited(dead);
    writeFileSync(join(stale, '.owner'), `${dead.pid}\n`);
    const other = join(tmp, 'gear-convert-notes'); // not ours: no owner file, not a 6-character temp name
    mkdirSync(other, { mode: 0o700 });
    const small = join(work, 'small.tar');
    await writeDockerArchive(small, [[{ path: 'a', content: 'a\n' }]], 'gear-test/small:1');
    await runConvert(`docker-archive:${small}`, `oci:${join(work, 'stale-out')}:v1`, { ...flags, tmpDir: tmp });
    expect(readdirSync(tmp)).toEqual(['gear-convert-notes']);
  }, 240_000);
});

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export { writeFileSync };
