/**
 * `gear copy` between two real registries (Debian docker-registry 2.8) and
 * an OCI layout: every Gear file the copied index names must be fetchable
 * from the destination and match its digests, the index must name the
 * destination as the files' location, keep-alive tags must hold every file,
 * and a Gear dockerd must pull and lazily run the copy with the source
 * registry stopped.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readIndexLayer } from '../../src/core/index/index-layer.js';
import { GearMediaType, type IndexManifest } from '../../src/core/index/manifest.js';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { run, runOk } from '../helpers/proc.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const ACCEPT = 'application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.v2+json';

let A: TestRegistry;
let B: TestRegistry;
let work: string;
let srcRef: string;
const data = {
  random: randomBytes(300_000), // stored raw (incompressible)
  text: Buffer.from('gear copy moves the files too\n'.repeat(20_000)), // stored gzip
};

interface CopyJson {
  manifestDigest: string;
  sourceManifestDigest: string;
  indexRewritten: boolean;
  location?: { registry: string; repository: string };
  blobs: number;
  blobsPresent: number;
  blobsMounted: number;
  blobsCopied: number;
  bytesCopied: number;
  keepAliveManifests: number;
}

async function gear(args: string[]): Promise<string> {
  const r = await runOk(process.execPath, [GEAR_CLI, ...args], { timeoutMs: 300_000 });
  return r.stdout;
}

async function copy(src: string, dst: string, extra: string[] = []): Promise<CopyJson> {
  return JSON.parse(await gear(['copy', '--json', '--no-progress', ...extra, src, dst])) as CopyJson;
}

async function get(url: string, accept = ACCEPT): Promise<{ status: number; bytes: Buffer }> {
  const res = await fetch(url, { headers: { accept } });
  return { status: res.status, bytes: Buffer.from(await res.arrayBuffer()) };
}

/** The index of an image in a registry, with every check a node would make on it. */
async function indexOf(reg: TestRegistry, repo: string, tag: string): Promise<{ digest: string; index: IndexManifest }> {
  const m = await get(`${reg.url}/v2/${repo}/manifests/${tag}`);
  expect(m.status).toBe(200);
  const doc = JSON.parse(m.bytes.toString('utf8')) as { layers: { digest: string }[] };
  expect(doc.layers).toHaveLength(1);
  const layer = await get(`${reg.url}/v2/${repo}/blobs/${doc.layers[0]!.digest}`);
  expect(`sha256:${hex(layer.bytes)}`).toBe(doc.layers[0]!.digest);
  const { manifest } = await readIndexLayer((async function* () { yield gunzipSync(layer.bytes); })());
  return { digest: `sha256:${hex(m.bytes)}`, index: manifest };
}

/** Every Gear file of the index fetched from reg/repo: blob digest, then content digest and size. */
async function expectAllFilesIn(reg: TestRegistry, repo: string, index: IndexManifest): Promise<number> {
  let n = 0;
  for (const f of index.files) {
    const blobDigest = f.blob?.digest ?? f.digest;
    const b = await get(`${reg.url}/v2/${repo}/blobs/${blobDigest}`, '*/*');
    expect(b.status, `${f.path} (${blobDigest}) in ${reg.host}/${repo}`).toBe(200);
    expect(`sha256:${hex(b.bytes)}`).toBe(blobDigest);
    const content = f.blob ? gunzipSync(b.bytes) : b.bytes;
    expect(`sha256:${hex(content)}`).toBe(f.digest);
    expect(content.length).toBe(f.size);
    n++;
  }
  return n;
}

/** The keep-alive manifests under `sha256-<M>.gear.<n>` list every Gear blob of the index. */
async function expectKeepAlive(reg: TestRegistry, repo: string, imageDigest: string, index: IndexManifest): Promise<void> {
  const want = new Set(index.files.map((f) => f.blob?.digest ?? f.digest));
  const got = new Set<string>();
  for (let i = 1; i <= 10; i++) {
    const m = await get(`${reg.url}/v2/${repo}/manifests/sha256-${imageDigest.slice(7)}.gear.${i}`);
    if (m.status !== 200) break;
    const doc = JSON.parse(m.bytes.toString('utf8')) as { artifactType: string; layers: { digest: string }[]; subject: { digest: string } };
    expect(doc.artifactType).toBe(GearMediaType.FilesManifest);
    expect(doc.subject.digest).toBe(imageDigest);
    for (const l of doc.layers) got.add(l.digest);
  }
  expect([...got].sort()).toEqual([...want].sort());
}

beforeAll(async () => {
  work = mkdtempSync('/tmp/gear-copy-it-');
  A = await startRegistry();
  B = await startRegistry();
  const layers: (LayerEntry[] | Buffer)[] = [
    [...(await busyboxLayer()), { path: 'data/', type: 'dir' }, { path: 'data/random', content: data.random }, { path: 'data/text', content: data.text }],
  ];
  const tar = join(work, 'src.tar');
  await writeDockerArchive(tar, layers, 'gear-test/copy-src:latest');
  srcRef = `${A.host}/team/app:gear`;
  // Format version 2 (one blob per file, both storage forms); v3 copies (packs) are in convert-v3.test.ts.
  await gear(['convert', '--no-progress', '--json', '--format-version', '2', `docker-archive:${tar}`, srcRef]);
}, 300_000);

afterAll(async () => {
  await A?.stop();
  await B?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

describe('gear copy', () => {
  let movedDigest: string;

  it('registry → another registry: every Gear file, a new index naming the destination, keep-alive tags; a rerun sends nothing', async () => {
    const src = await indexOf(A, 'team/app', 'gear');
    expect(src.index.location).toEqual({ registry: A.host, repository: 'team/app' });
    expect(src.index.files.some((f) => f.blob)).toBe(true); // both storage forms are covered
    expect(src.index.files.some((f) => !f.blob)).toBe(true);

    const s = await copy(srcRef, `${B.host}/moved/app:v1`);
    expect(s.indexRewritten).toBe(true);
    expect(s.location).toEqual({ registry: B.host, repository: 'moved/app' });
    expect(s.blobsCopied).toBe(s.blobs);
    expect(s.blobs).toBe(new Set(src.index.files.map((f) => f.blob?.digest ?? f.digest)).size);
    expect(s.sourceManifestDigest).toBe(src.digest);
    expect(s.manifestDigest).not.toBe(src.digest);

    const dst = await indexOf(B, 'moved/app', 'v1');
    expect(dst.digest).toBe(s.manifestDigest);
    expect(dst.index.location).toEqual({ registry: B.host, repository: 'moved/app' });
    expect(dst.index.files).toEqual(src.index.files);
    expect(await expectAllFilesIn(B, 'moved/app', dst.index)).toBe(src.index.files.length);
    await expectKeepAlive(B, 'moved/app', s.manifestDigest, dst.index);
    movedDigest = s.manifestDigest;

    const again = await copy(srcRef, `${B.host}/moved/app:v1`);
    expect(again.blobsCopied).toBe(0);
    expect(again.blobsPresent).toBe(s.blobs);
    expect(again.manifestDigest).toBe(s.manifestDigest);
  });

  it('registry → same registry, other repository: files are mounted, not sent', async () => {
    const s = await copy(srcRef, `${A.host}/other/app:v1`);
    expect(s.blobsMounted).toBe(s.blobs);
    expect(s.blobsCopied).toBe(0);
    const dst = await indexOf(A, 'other/app', 'v1');
    expect(dst.index.location).toEqual({ registry: A.host, repository: 'other/app' });
    await expectAllFilesIn(A, 'other/app', dst.index);
  });

  it('registry → oci: keeps the image byte for byte, with its files; oci: → registry makes it whole there', async () => {
    const layout = join(work, 'layout');
    const s1 = await copy(srcRef, `oci:${layout}:gear`);
    const src = await indexOf(A, 'team/app', 'gear');
    expect(s1.indexRewritten).toBe(false);
    expect(s1.manifestDigest).toBe(src.digest);
    expect(s1.blobsCopied).toBe(s1.blobs);

    const s2 = await copy(`oci:${layout}:gear`, `${B.host}/from-layout/app:v1`);
    expect(s2.indexRewritten).toBe(true);
    expect(s2.blobsCopied).toBe(s2.blobs);
    const dst = await indexOf(B, 'from-layout/app', 'v1');
    expect(dst.index.location).toEqual({ registry: B.host, repository: 'from-layout/app' });
    await expectAllFilesIn(B, 'from-layout/app', dst.index);
    await expectKeepAlive(B, 'from-layout/app', s2.manifestDigest, dst.index);

    // --location for an oci: destination records where the files will be; copying there then keeps the digest.
    const s3 = await copy(srcRef, `oci:${layout}:located`, ['--location', `${B.host}/located/app`]);
    expect(s3.indexRewritten).toBe(true);
    const s4 = await copy(`oci:${layout}:located`, `${B.host}/located/app:v1`);
    expect(s4.indexRewritten).toBe(false);
    expect(s4.manifestDigest).toBe(s3.manifestDigest);
    await expectAllFilesIn(B, 'located/app', (await indexOf(B, 'located/app', 'v1')).index);
  });

  it('refuses a non-Gear image and non-registry sources, naming why', async () => {
    const tar = join(work, 'plain.tar');
    await writeDockerArchive(tar, [[{ path: 'a', content: 'a\n' }], [{ path: 'b', content: 'b\n' }]], 'plain:1');
    const r1 = await run(process.execPath, [GEAR_CLI, 'copy', `docker-archive:${tar}`, `${B.host}/x/y:1`], { timeoutMs: 60_000 });
    expect(r1.code).not.toBe(0);
    expect(r1.stderr).toMatch(/gear convert/);
  });

  it('a Gear dockerd pulls the copy and runs it lazily with the source registry stopped', async (ctx) => {
    if (!movedDigest || !(await gearDaemonAvailable())) return ctx.skip();
    await A.stop(); // the files can only come from B now
    let d: Dockerd | undefined;
    try {
      d = await startDockerd({ driver: 'gear', gearArgs: ['--fetch-timeout', '20s'] });
      const ref = `${B.host}/moved/app:v1`;
      await d.dockerOk(['pull', ref]);
      const out = await d.dockerOk(['run', '--rm', ref, 'sh', '-c', 'sha256sum /data/random /data/text | cut -c1-64']);
      expect(out.stdout.trim().split('\n')).toEqual([hex(data.random), hex(data.text)]);
    } finally {
      await d?.stop();
    }
  });
});
