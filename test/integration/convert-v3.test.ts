/**
 * `gear convert` writing format version 3 (packs, chunks, reuse) against a
 * real registry (Debian docker-registry 2.8), read back as a node would: the
 * index, then each member by an HTTP Range request of its pack, decompressed
 * and checked against its digest. Uploads are counted by a forwarding proxy
 * in front of the registry.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runConvert } from '../../src/cli/convert.js';
import { runCopy } from '../../src/cli/copy.js';
import { runPrefetch } from '../../src/cli/prefetch.js';
import { writeFileSync } from 'node:fs';
import { readIndexLayer } from '../../src/core/index/index-layer.js';
import { chunkBytes, GEAR_VERSION_LABEL, GearMediaType, type IndexFile, type IndexManifest } from '../../src/core/index/manifest.js';
import { zstdDecompress } from '../../src/core/sys/zstd.js';
import { ensureMinbaseTar } from '../helpers/images.js';
import { sha256, writeOciImage, type LayerEntry } from '../helpers/oci-images.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const exec = promisify(execFile);
const GEAR_CLI_PATH = join(import.meta.dirname, '../../dist/cli/gear.js');
const flags = { concurrency: '4', filesPerManifest: '10000', insecureRegistry: [] as string[], progress: false, json: true };
const ACCEPT = 'application/vnd.oci.image.manifest.v1+json,application/vnd.oci.image.index.v1+json';

let reg: TestRegistry;
let proxy: FaultProxy;
let work: string;
let minbaseOci: string;
let extendedOci: string;
/** Only the extra files (for the v1/v2 checks, which upload one blob per file). */
let smallOci: string;
/** Content of the files the extra layer adds. */
const extra = {
  big: Buffer.concat([randomBytes(3 * 1024 * 1024), Buffer.alloc(3 * 1024 * 1024 + 4321, 'x')]), // 6 MiB + 4321: 7 chunks, raw and zstd
  noise: randomBytes(300_000), // incompressible: stored raw
  text: Buffer.from('gear v3 extra file\n'.repeat(1000)),
};

beforeAll(async () => {
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url);
  work = mkdtempSync('/tmp/gear-convert-v3-test-');
  const tar = readFileSync(await ensureMinbaseTar());
  minbaseOci = join(work, 'minbase');
  await writeOciImage(minbaseOci, [tar], { tag: 'v1' });
  extendedOci = join(work, 'extended');
  const layer: LayerEntry[] = [
    { path: 'opt/', type: 'dir' },
    { path: 'opt/big.bin', content: extra.big },
    { path: 'opt/noise.bin', content: extra.noise },
    { path: 'opt/text.txt', content: extra.text },
  ];
  await writeOciImage(extendedOci, [tar, layer], { tag: 'v1' });
  smallOci = join(work, 'small');
  await writeOciImage(smallOci, [layer], { tag: 'v1' });
}, 300_000);

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

async function getJson(url: string): Promise<{ status: number; body: any }> {
  const res = await fetch(url, { headers: { accept: ACCEPT } });
  const bytes = Buffer.from(await res.arrayBuffer());
  return { status: res.status, body: res.status === 200 ? JSON.parse(bytes.toString('utf8')) : undefined };
}

async function blob(repo: string, digest: string, range?: [number, number]): Promise<Buffer> {
  const res = await fetch(`${reg.url}/v2/${repo}/blobs/${digest}`, range ? { headers: { range: `bytes=${range[0]}-${range[1]}` } } : {});
  expect(res.status, `blob ${digest} ${range ?? ''}`).toBe(range ? 206 : 200);
  return Buffer.from(await res.arrayBuffer());
}

async function pullIndex(repo: string, tag: string): Promise<{ manifest: any; config: any; index: IndexManifest }> {
  const m = await getJson(`${reg.url}/v2/${repo}/manifests/${tag}`);
  expect(m.status).toBe(200);
  const config = JSON.parse((await blob(repo, m.body.config.digest)).toString('utf8'));
  const layer = gunzipSync(await blob(repo, m.body.layers[0].digest));
  const { manifest } = await readIndexLayer((async function* () { yield layer; })());
  return { manifest: m.body, config, index: manifest };
}

/** A file's content read member by member from the registry as a node reads it: range, decompress, verify. */
async function readFile3(repo: string, index: IndexManifest, f: IndexFile): Promise<Buffer> {
  const member = async (m: { pack: number; offset: number; length: number; encoding?: string }, size: number) => {
    const pack = index.packs![m.pack]!;
    expect(m.offset + m.length).toBeLessThanOrEqual(pack.size);
    const bytes = await blob(repo, pack.digest, [m.offset, m.offset + m.length - 1]);
    return m.encoding === 'raw' ? bytes : zstdDecompress(bytes, size);
  };
  let content: Buffer;
  if (f.member) content = await member(f.member, f.size);
  else {
    expect(f.chunks, f.path).toBeDefined();
    const parts: Buffer[] = [];
    for (let i = 0; i < f.chunks!.length; i++) {
      const c = f.chunks![i]!;
      const b = await member(c, chunkBytes(f, i));
      expect(sha256(b), `${f.path} chunk ${i}`).toBe(c.digest);
      parts.push(b);
    }
    content = Buffer.concat(parts);
  }
  expect(sha256(content), f.path).toBe(f.digest);
  expect(content.length).toBe(f.size);
  return content;
}

/** Upload sessions started without a mount (POST …/blobs/uploads/ with no mount=) seen by the proxy since `from`. */
const uploadsSince = (from: number) => proxy.seen.slice(from).filter((l) => /^POST \/v2\/.+\/blobs\/uploads\/$/.test(l));
const mountsSince = (from: number) => proxy.seen.slice(from).filter((l) => /^POST \/v2\/.+\/blobs\/uploads\/\?mount=/.test(l));

describe('gear convert, format version 3', () => {
  it('converts minbase plus big, incompressible and text files into packs; every member range reads back and verifies', async () => {
    const s = await runConvert(`oci:${extendedOci}:v1`, `${proxy.host}/v3/ext:v1`, flags);
    expect(s.v3).toBeDefined();
    const { manifest, config, index } = await pullIndex('v3/ext', 'v1');
    expect(index.version).toBe(3);
    expect(config.config.Labels[GEAR_VERSION_LABEL]).toBe('3');
    expect(index.packs!.length).toBeGreaterThanOrEqual(2);
    for (const p of index.packs!) expect(p.size).toBeLessThanOrEqual(32 * 1024 * 1024 + 5 * 1024 * 1024);
    expect(index.files.every((f) => !f.blob && (f.member !== undefined) !== (f.chunks !== undefined))).toBe(true);
    // Packs are filled in path order: the first member of pack 0 is the first file in path order.
    expect(index.files[0]!.member ?? index.files[0]!.chunks![0]).toMatchObject({ pack: 0, offset: 0 });

    const byPath = new Map(index.files.map((f) => [f.path, f]));
    const big = byPath.get('opt/big.bin')!;
    expect(big.chunkSize).toBe(1024 * 1024);
    expect(big.chunks).toHaveLength(7);
    expect(big.chunks!.slice(0, 3).every((c) => c.encoding === 'raw')).toBe(true);
    expect(big.chunks!.slice(3).every((c) => (c.encoding ?? 'zstd') === 'zstd')).toBe(true);
    // chunks contiguous and in order
    for (let i = 1; i < big.chunks!.length; i++) {
      const [a, b] = [big.chunks![i - 1]!, big.chunks![i]!];
      if (a.pack === b.pack) expect(b.offset).toBe(a.offset + a.length);
      else expect(b).toMatchObject({ pack: a.pack + 1, offset: 0 });
    }
    expect(byPath.get('opt/noise.bin')!.member!.encoding).toBe('raw');
    expect(byPath.get('opt/text.txt')!.member!.encoding ?? 'zstd').toBe('zstd');
    expect((await readFile3('v3/ext', index, big)).equals(extra.big)).toBe(true);
    expect((await readFile3('v3/ext', index, byPath.get('opt/noise.bin')!)).equals(extra.noise)).toBe(true);
    // every distinct content of the image, member by member
    const seen = new Set<string>();
    for (const f of index.files) {
      if (seen.has(f.digest)) continue;
      seen.add(f.digest);
      await readFile3('v3/ext', index, f);
    }
    expect(seen.size).toBe(s.uniqueContents);
    // keep-alive: the packs, with the pack media type
    const keep = await getJson(`${reg.url}/v2/v3/ext/manifests/sha256-${sha256(Buffer.from(JSON.stringify(manifest))).slice(7)}.gear.1`);
    expect(keep.status).toBe(200);
    expect(keep.body.layers.map((l: { digest: string }) => l.digest).sort()).toEqual(index.packs!.map((p) => p.digest).sort());
    expect(keep.body.layers.every((l: { mediaType: string }) => l.mediaType === GearMediaType.Pack)).toBe(true);
  }, 300_000);

  it('converting the same image again uploads nothing', async () => {
    const first = await runConvert(`oci:${minbaseOci}:v1`, `${proxy.host}/v3/minbase:v1`, flags);
    expect(first.v3!.packsUploaded).toBeGreaterThan(0);
    const from = proxy.seen.length;
    const again = await runConvert(`oci:${minbaseOci}:v1`, `${proxy.host}/v3/minbase:v1`, flags);
    expect(uploadsSince(from)).toEqual([]);
    expect(again.bytesUploaded).toBe(0);
    expect(again.v3!.reusedFiles).toBe(again.files);
    expect(again.v3!.newPacks).toBe(0);
    expect(again.v3!.compressedMembers).toBe(0); // nothing compressed: every member was known
    expect(again.manifestDigest).toBe(first.manifestDigest);
  }, 300_000);

  it('--dedup-with into another repository uploads only the new files and mounts the old packs', async () => {
    const base = await runConvert(`oci:${minbaseOci}:v1`, `${proxy.host}/v3/base:v1`, flags);
    const from = proxy.seen.length;
    const s = await runConvert(`oci:${extendedOci}:v1`, `${proxy.host}/v3/app:v1`, { ...flags, dedupWith: [`${proxy.host}/v3/base:v1`] });
    const { index } = await pullIndex('v3/app', 'v1');
    const newBytes = extra.big.length + extra.noise.length + extra.text.length;
    expect(s.v3!.reusedFiles).toBe(s.files - 3);
    expect(s.v3!.packsMounted).toBe(base.v3!.packs);
    expect(mountsSince(from).length).toBeGreaterThanOrEqual(base.v3!.packs);
    // one new pack, with only the three new files (compressed: less than their size)
    expect(s.v3!.newPacks).toBe(1);
    expect(s.v3!.packBytesUploaded).toBeLessThan(newBytes);
    expect(uploadsSince(from).length).toBe(s.blobsUploaded);
    expect(s.bytesUploaded).toBeLessThan(newBytes + s.indexSize + 50_000);
    // the mounted packs are in the new repository, and the image reads back whole
    const seen = new Set<string>();
    for (const f of index.files) {
      if (!seen.has(f.digest) && (seen.add(f.digest), seen.size % 25 === 0 || f.path.startsWith('opt/'))) await readFile3('v3/app', index, f);
    }
    // a v2 image given for dedup is skipped with a notice
    await runConvert(`oci:${smallOci}:v1`, `${proxy.host}/v3/old:v2`, { ...flags, formatVersion: '2' });
    const n = await runConvert(`oci:${smallOci}:v1`, `${proxy.host}/v3/app2:v1`, { ...flags, dedupWith: [`${proxy.host}/v3/old:v2`] });
    expect(n.v3!.notices.join('\n')).toMatch(/version 2 image; only version 3 packs are reused/);
    expect(n.v3!.reusedFiles).toBe(0);
  }, 300_000);

  it('still writes format versions 1 and 2 on request', async () => {
    for (const v of ['1', '2'] as const) {
      const s = await runConvert(`oci:${smallOci}:v1`, `${reg.host}/v3/compat:v${v}`, { ...flags, formatVersion: v });
      expect(s.v3).toBeUndefined();
      const { config, index } = await pullIndex('v3/compat', `v${v}`);
      expect(index.version).toBe(Number(v));
      expect(config.config.Labels[GEAR_VERSION_LABEL]).toBe(v);
      expect(index.packs).toBeUndefined();
      const f = index.files.find((x) => x.path === 'opt/text.txt')!;
      expect(gunzipSync(await blob('v3/compat', f.blob!.digest)).equals(extra.text)).toBe(true);
    }
  }, 300_000);

  it('gear copy moves the packs (mounted within a registry); gear prefetch re-packs the listed files in list order at the front', async () => {
    await runConvert(`oci:${smallOci}:v1`, `${reg.host}/v3/small:v1`, flags);
    const src = await pullIndex('v3/small', 'v1');
    const c = await runCopy(`${reg.host}/v3/small:v1`, `${reg.host}/v3/small-copy:v1`, { concurrency: '4', filesPerManifest: '10000', insecureRegistry: [], progress: false, json: true });
    expect(c.blobs).toBe(src.index.packs!.length);
    expect(c.blobsMounted).toBe(c.blobs);
    const copied = await pullIndex('v3/small-copy', 'v1');
    expect(copied.index.packs).toEqual(src.index.packs);
    for (const f of copied.index.files) await readFile3('v3/small-copy', copied.index, f);

    // prefetch: text, then noise; big.bin (not listed) keeps its ranges in its old pack
    const list = join(work, 'prefetch.txt');
    writeFileSync(list, 'opt/text.txt\nopt/noise.bin\n');
    const p = await runPrefetch(`${reg.host}/v3/small:v1`, `${reg.host}/v3/small:fast`, { list, insecureRegistry: [], json: true });
    expect(p.repacked).toMatchObject({ packs: 1, members: 2 });
    const fast = (await pullIndex('v3/small', 'fast')).index;
    expect(fast.prefetch).toEqual(['opt/text.txt', 'opt/noise.bin']);
    const by = new Map(fast.files.map((f) => [f.path, f]));
    const text = by.get('opt/text.txt')!.member!;
    const noise = by.get('opt/noise.bin')!.member!;
    expect(text).toMatchObject({ pack: 0, offset: 0 });
    expect(noise).toMatchObject({ pack: 0, offset: text.length });
    expect(fast.packs![0]!.size).toBe(text.length + noise.length);
    const big = by.get('opt/big.bin')!;
    const oldBig = src.index.files.find((f) => f.path === 'opt/big.bin')!;
    expect(big.chunks!.map((x) => [fast.packs![x.pack]!.digest, x.offset, x.length])).toEqual(oldBig.chunks!.map((x) => [src.index.packs![x.pack]!.digest, x.offset, x.length]));
    for (const f of fast.files) await readFile3('v3/small', fast, f);
  }, 300_000);

  it('packs are uploaded while the layers are read; a pack whose files a later layer removed is left out of the index', async () => {
    // Layer 1: 40 MB of incompressible files under gone/ (a 32 MiB pack of their own and the start of the next),
    // then keep/; layer 2 removes gone/ (a whiteout) and adds a file.
    const gone = Array.from({ length: 10 }, () => randomBytes(4_000_000 - 1)); // below the 4 MiB chunking bound
    const keep = randomBytes(200_000);
    const layer1: LayerEntry[] = [
      { path: 'gone/', type: 'dir' },
      ...gone.map((content, i) => ({ path: `gone/f${i}`, content })),
      { path: 'keep/', type: 'dir' },
      { path: 'keep/a', content: keep },
    ];
    const layer2: LayerEntry[] = [{ path: '.wh.gone', content: '' }, { path: 'new.txt', content: Buffer.from('new\n') }];
    const src = join(work, 'removed');
    await writeOciImage(src, [layer1, layer2], { tag: 'v1' });
    const s = (await runConvert(`oci:${src}:v1`, `${reg.host}/v3/removed:v1`, flags)) as unknown as {
      v3: { packsUploaded: number; newPacks: number; notices: string[] };
    };
    // Every pack was uploaded; the one holding only removed files is not listed, and the summary says so.
    expect(s.v3.packsUploaded).toBe(s.v3.newPacks + 1);
    expect(s.v3.notices.join('\n')).toMatch(/1 pack\(s\) \(3[0-9]\.[0-9] MB\) uploaded while the layers were read hold only files a later layer removed or replaced/);
    const { index } = await pullIndex('v3/removed', 'v1');
    expect(index.files.map((f) => f.path).sort()).toEqual(['keep/a', 'new.txt']);
    expect(index.packs).toHaveLength(s.v3.newPacks);
    expect((await readFile3('v3/removed', index, index.files.find((f) => f.path === 'keep/a')!)).equals(keep)).toBe(true);
    expect((await readFile3('v3/removed', index, index.files.find((f) => f.path === 'new.txt')!)).toString()).toBe('new\n');
  }, 300_000);

  it('a conversion killed with -9 while it uploads is completed by a rerun, which reuses its staged packs and leaves no staging folder', async () => {
    // Uploads through this proxy never finish: the run stages its packs, then hangs in the first PUT.
    const stuck = await startFaultProxy(reg.url, (req) => (req.method === 'PUT' && req.url?.includes('/blobs/uploads/') ? { kind: 'hang' } : undefined));
    const tmp = mkdtempSync(join(work, 'tmp-kill-'));
    let child: ChildProcess | undefined;
    try {
      child = spawn(process.execPath, [GEAR_CLI_PATH, 'convert', '--no-progress', '--json', '--tmp-dir', tmp, `oci:${minbaseOci}:v1`, `${stuck.host}/v3/killed:v1`], {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: process.env,
      });
      const stagedPacks = () => readdirSync(tmp).flatMap((d) => readdirSync(join(tmp, d)).filter((n) => /^pack-[a-f0-9]{64}$/.test(n)));
      const deadline = Date.now() + 180_000;
      while (Date.now() < deadline && child.exitCode === null && stagedPacks().length === 0) await new Promise((r) => setTimeout(r, 20));
      expect(child.exitCode, 'the conversion ended before it staged a pack').toBeNull();
      expect(stagedPacks().length).toBeGreaterThan(0);
      child.kill('SIGKILL');
      await new Promise((r) => (child!.exitCode !== null || child!.signalCode !== null ? r(null) : child!.once('exit', r)));
      expect(readdirSync(tmp)).toHaveLength(1); // what kill -9 leaves
      const r = await exec(process.execPath, [GEAR_CLI_PATH, 'convert', '--no-progress', '--json', '--tmp-dir', tmp, `oci:${minbaseOci}:v1`, `${reg.host}/v3/killed:v1`], {
        maxBuffer: 16 << 20,
        env: process.env,
      });
      const s = JSON.parse(r.stdout) as { v3: { packsResumed: number; newPacks: number } };
      expect(s.v3.packsResumed).toBeGreaterThan(0);
      expect(readdirSync(tmp)).toEqual([]);
      const { index } = await pullIndex('v3/killed', 'v1');
      let n = 0;
      for (const f of index.files) if (n++ % 40 === 0) await readFile3('v3/killed', index, f);
    } finally {
      if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await stuck.stop();
    }
  }, 400_000);
});

export const _hash = (b: Buffer) => createHash('sha256').update(b).digest('hex');
