/**
 * `gear analyze` on three tiny images whose sharing is computed by hand here:
 * two OCI layouts sharing a base layer, and a legacy docker-archive.
 *
 * Contents (A, B, D, E are pseudo-random, so stored raw; C and G compress):
 *   L0 (base):  a.txt=A(1000) a-copy=A b.bin=B(3000) c.txt=C(5000 'x') empty=(0) h→b.bin (hard link) s→a.txt (symlink)
 *   L1:         d=D(2000), whiteout of c.txt
 *   L2:         e2=E(4000) f=D
 *   L3:         a=A e=E g=G(20000 'y') h.dat=H(300000 'h', streamed rather than read whole)
 *   image 1 = oci [L0, L1]    files a.txt a-copy b.bin d          (c.txt hidden)
 *   image 2 = oci [L0, L2]    files a.txt a-copy b.bin c.txt e2 f
 *   image 3 = docker-archive [L3]  files a e g h.dat
 * The analyze figures are then checked against what `gear convert` of the
 * same images into one OCI layout reports uploading.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { analyzeImages } from '../../src/analyze/analyze.js';
import { renderSvg, writePlot } from '../../src/analyze/plot.js';
import { formatReport, type AnalyzeReport } from '../../src/analyze/report.js';
import { runAnalyze } from '../../src/cli/analyze.js';
import { convertImage } from '../../src/convert/convert.js';
import { ociLayoutDestination } from '../../src/convert/destination.js';
import { openDockerArchive, openOciLayout } from '../../src/convert/source.js';
import { layerTar, writeDockerArchive, writeOciImage, type LayerEntry } from '../helpers/oci-images.js';

/** Deterministic incompressible bytes. */
function noise(seed: string, n: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; parts.length * 32 < n; i++) parts.push(createHash('sha256').update(`${seed}:${i}`).digest());
  return Buffer.concat(parts).subarray(0, n);
}

const A = noise('A', 1000);
const B = noise('B', 3000);
const C = Buffer.alloc(5000, 'x');
const D = noise('D', 2000);
const E = noise('E', 4000);
const G = Buffer.alloc(20000, 'y');
const H = Buffer.alloc(300000, 'h');
const gz = (b: Buffer) => gzipSync(b, { level: 6 }).length;

const L0: LayerEntry[] = [
  { path: 'a.txt', content: A },
  { path: 'a-copy', content: A },
  { path: 'b.bin', content: B },
  { path: 'c.txt', content: C },
  { path: 'empty', content: '' },
  { path: 'h', type: 'link', linkname: 'b.bin' },
  { path: 's', type: 'symlink', linkname: 'a.txt' },
];
const L1: LayerEntry[] = [{ path: 'd', content: D }, { path: '.wh.c.txt' }];
const L2: LayerEntry[] = [
  { path: 'e2', content: E },
  { path: 'f', content: D },
];
const L3: LayerEntry[] = [
  { path: 'a', content: A },
  { path: 'e', content: E },
  { path: 'g', content: G },
  { path: 'h.dat', content: H },
];

let work: string;
let img1: string;
let img2: string;
let img3: string;
let report: AnalyzeReport;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'gear-analyze-test-'));
  await writeOciImage(join(work, 'one'), [L0, L1]);
  await writeOciImage(join(work, 'two'), [L0, L2]);
  await writeDockerArchive(join(work, 'three.tar'), [L3]);
  img1 = `oci:${join(work, 'one')}`;
  img2 = `oci:${join(work, 'two')}`;
  img3 = `docker-archive:${join(work, 'three.tar')}`;
  report = await runAnalyze([img1, img2, img3], { json: true, progress: false, chunks: '4KiB', storage: 'auto', rawAbove: '8MiB', formatVersion: '2', insecureRegistry: [] });
});

afterAll(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

/** Sizes of an OCI layout's layer blobs, from its manifest. */
function ociLayerSizes(dir: string): { digest: string; size: number }[] {
  const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8'));
  const m = JSON.parse(readFileSync(join(dir, 'blobs/sha256', index.manifests[0].digest.slice(7)), 'utf8'));
  return m.layers.map((l: { digest: string; size: number }) => ({ digest: l.digest, size: l.size }));
}

describe('gear analyze: a hand-computed case', () => {
  it('counts files per image as gear convert does (hard links once, empty files not at all, hidden files not at all)', () => {
    const [i1, i2, i3] = report.images;
    expect(i1).toMatchObject({ files: 4, fileBytes: 7000, distinctContents: 3, distinctBytes: 6000, duplicateFiles: 1, duplicateBytes: 1000, uniqueContents: 0, uniqueBytes: 0, layers: 2 });
    expect(i2).toMatchObject({ files: 6, fileBytes: 16000, distinctContents: 5, distinctBytes: 15000, duplicateFiles: 1, duplicateBytes: 1000, uniqueContents: 1, uniqueBytes: 5000, layers: 2 });
    expect(i3).toMatchObject({ files: 4, fileBytes: 325000, distinctContents: 4, distinctBytes: 325000, duplicateFiles: 0, duplicateBytes: 0, uniqueContents: 2, uniqueBytes: 320000, layers: 1 });
  });

  it('reports file-level redundancy within and across images', () => {
    expect(report.files).toEqual({
      files: 14,
      bytes: 348000,
      distinct: 7,
      distinctBytes: 335000,
      withinImages: { files: 2, bytes: 2000 },
      acrossImages: { files: 5, bytes: 11000 },
      storedBytes: 1000 + 3000 + 2000 + 4000 + gz(C) + gz(G) + gz(H),
      gzipBlobs: 3,
      rawBlobs: 4,
    });
  });

  it('reports the pairwise sharing matrix', () => {
    expect(report.sharing.images).toEqual([img1, img2, img3]);
    expect(report.sharing.bytes).toEqual([
      [6000, 6000, 1000],
      [6000, 15000, 5000],
      [1000, 5000, 325000],
    ]);
  });

  it('reports layer-level sharing by blob', async () => {
    const one = ociLayerSizes(join(work, 'one'));
    const two = ociLayerSizes(join(work, 'two'));
    expect(one[0]!.digest).toBe(two[0]!.digest); // L0, the shared base
    // L3 in a legacy docker-archive: a plain tar, stored as it is.
    const l3 = statSync(join(work, 'three.tar')).size; // upper bound only; the exact figure is the layer tar's
    const stored = one[0]!.size + one[1]!.size + two[1]!.size;
    expect(report.layers.references).toBe(5);
    expect(report.layers.distinct).toBe(4);
    expect(report.layers.shared).toBe(1);
    expect(report.layers.sharedStoredBytes).toBe(one[0]!.size);
    expect(report.layers.uncompressedBlobs).toBe(1);
    const l3Stored = report.images[2]!.layerBytes.stored;
    expect(l3Stored).toBe(report.images[2]!.layerBytes.uncompressed);
    expect(l3Stored).toBeLessThan(l3);
    expect(l3Stored % 512).toBe(0);
    expect(report.layers.distinctBytes.stored).toBe(stored + l3Stored);
    expect(report.layers.referencedBytes.stored).toBe(stored + one[0]!.size + l3Stored);
    expect(report.images[0]!.layerBytes.stored).toBe(one[0]!.size + one[1]!.size);
    // A registry would hold L3 gzipped: estimated as its gzip -6.
    const l3Tar = await layerTar(L3);
    expect(l3Stored).toBe(l3Tar.length);
    expect(report.layers.distinctBytes.registry).toBe(stored + gz(l3Tar));
    expect(report.storage.layers.layerBytes).toBe(stored + gz(l3Tar));
  });

  it('reports fixed-size chunks: files cut on their own, identical chunks once', () => {
    // A, B, D, E: one chunk each; C: 4096 + 904 'x'; G: 4 × 4096 'y' (one distinct) + 3616 'y';
    // H: 73 × 4096 'h' (one distinct) + 992 'h'.
    const gzChunks = [Buffer.alloc(4096, 'x'), Buffer.alloc(904, 'x'), Buffer.alloc(4096, 'y'), Buffer.alloc(3616, 'y'), Buffer.alloc(4096, 'h'), Buffer.alloc(992, 'h')].map(gz);
    expect(report.chunks).toEqual({
      size: 4096,
      chunks: 4 + 7 + (1 + 1 + 5 + 74),
      bytes: 348000,
      distinct: 10,
      distinctBytes: 1000 + 3000 + 2000 + 4000 + 4096 + 904 + 4096 + 3616 + 4096 + 992,
      storedBytes: 1000 + 3000 + 2000 + 4000 + gzChunks.reduce((a, b) => a + b, 0),
      gzipChunks: 6,
    });
  });

  it('predicts exactly what gear convert uploads, image by image and in total', async () => {
    const dst = join(work, 'converted');
    let uploaded = 0;
    let blobs = 0;
    const sources = [() => openOciLayout(join(work, 'one')), () => openOciLayout(join(work, 'two')), () => openDockerArchive(join(work, 'three.tar'))];
    for (let i = 0; i < sources.length; i++) {
      const src = await sources[i]!();
      // Alone, into an empty layout: the per-image figure.
      const alone = await convertImage(src, await ociLayoutDestination(join(work, `alone-${i}:t`)), { tmpDir: work, formatVersion: 2 });
      expect(alone.files).toBe(report.images[i]!.files);
      expect(alone.uniqueContents).toBe(report.images[i]!.distinctContents);
      expect(alone.bytesUploaded).toBe(report.images[i]!.gear.totalBytes);
      // Together, into one layout: the total.
      const s = await convertImage(src, await ociLayoutDestination(`${dst}:img${i}`), { tmpDir: work, formatVersion: 2 });
      uploaded += s.bytesUploaded;
      blobs += s.blobsUploaded;
      expect(s.indexSize).toBe(report.images[i]!.gear.indexBytes);
      await src.close();
    }
    expect(uploaded).toBe(report.storage.gear.totalBytes);
    expect(blobs).toBe(report.storage.gear.blobs);
  });

  it('gives a content of one chunk the stored size of the file (read whole or streamed)', async () => {
    const r = await runAnalyze([img3], { progress: false, chunks: '1MiB', storage: 'auto', rawAbove: '8MiB', formatVersion: '2', insecureRegistry: [] });
    expect(r.chunks).toMatchObject({ distinct: 4, distinctBytes: 325000, storedBytes: 1000 + 4000 + gz(G) + gz(H), gzipChunks: 2 });
    expect(r.chunks!.storedBytes).toBe(r.files.storedBytes);
  });

  it('predicts raw storage and --raw-above as convert applies them', async () => {
    const raw = await runAnalyze([img2], { progress: false, storage: 'raw', rawAbove: '8MiB', formatVersion: '2', insecureRegistry: [] });
    expect(raw.files.storedBytes).toBe(15000);
    expect(raw.files.gzipBlobs).toBe(0);
    // C (5000 bytes) at the cut: stored raw.
    const cut = await runAnalyze([img2], { progress: false, storage: 'auto', rawAbove: '5000', formatVersion: '2', insecureRegistry: [] });
    expect(cut.files.storedBytes).toBe(15000);
    const below = await runAnalyze([img2], { progress: false, storage: 'auto', rawAbove: '5001', formatVersion: '2', insecureRegistry: [] });
    expect(below.files.storedBytes).toBe(15000 - 5000 + gz(C));
  });

  it('prints a table naming every figure', () => {
    const text = formatReport(report);
    expect(text).toMatch(/3 image\(s\), 5 layer\(s\) \(4 distinct\), 14 file\(s\) \(7 distinct contents\)/);
    expect(text).toContain('files, duplicate across images');
    expect(text).toContain('Gear (gear convert)');
    expect(text).toContain('chunks of 4.0 KiB, distinct');
    expect(text).toMatch(/#1\s+5\.9 KiB\s+5\.9 KiB\s+1000 B/);
  });

  it('writes the plot as SVG and PNG', async () => {
    const svg = renderSvg(report);
    expect(svg.startsWith('<svg')).toBe(true);
    expect(svg).toContain('Registry storage per scheme');
    expect(svg.match(/<rect /g)!.length).toBeGreaterThan(9 + 3); // the 3×3 matrix, bars, legend
    await writePlot(report, join(work, 'plot.svg'));
    expect(readFileSync(join(work, 'plot.svg'), 'utf8')).toBe(svg);
    await writePlot(report, join(work, 'plot.png'));
    const png = readFileSync(join(work, 'plot.png'));
    expect(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))).toBe(true);
    // IHDR: width and height of the rendered picture (1.5× the SVG's).
    const w = png.readUInt32BE(16);
    const h = png.readUInt32BE(20);
    expect(w).toBeGreaterThanOrEqual(1200);
    expect(h).toBeGreaterThanOrEqual(600);
    expect(png.length).toBeGreaterThan(10_000);
    await expect(writePlot(report, join(work, 'plot.jpg'))).rejects.toThrow(/\.svg or \.png/);
  });

  it('refuses bad options with the cause named', async () => {
    const base = { progress: false, storage: 'auto', rawAbove: '8MiB', formatVersion: '2', insecureRegistry: [] as string[] };
    await expect(runAnalyze([img1], { ...base, chunks: '1KiB' })).rejects.toThrow(/--chunks 1KiB: want a chunk size from 4\.0 KiB/);
    await expect(runAnalyze([img1], { ...base, storage: 'zip' })).rejects.toThrow(/--storage must be auto or raw/);
    await expect(runAnalyze([], base)).rejects.toThrow(/at least one image/);
    await expect(runAnalyze([`oci:${join(work, 'nope')}`], base)).rejects.toThrow(/nope.*no index\.json/);
  });

  it('builds the pairwise matrix for many images from grouped image sets', async () => {
    // 120 images: S in all, P0 in the even ones, P1 in the odd ones, U<i> in image i only.
    const n = 120;
    const S = noise('S', 700);
    const P = [noise('P0', 300), noise('P1', 500)];
    const inputs = [];
    for (let i = 0; i < n; i++) {
      const dir = join(work, 'many', String(i));
      await writeOciImage(dir, [[{ path: 's', content: S }, { path: 'p', content: P[i % 2]! }, { path: 'u', content: noise(`U${i}`, 100 + i) }]]);
      inputs.push({ name: `img-${i}`, open: () => openOciLayout(dir) });
    }
    const r = await analyzeImages(inputs);
    expect(r.files.distinct).toBe(3 + n);
    expect(r.files.acrossImages.files).toBe((n - 1) + (n / 2 - 1) * 2);
    for (const [a, b] of [[0, 1], [0, 2], [7, 9], [7, 8], [118, 119], [3, 3]] as const) {
      const want = a === b ? 700 + P[a % 2]!.length + 100 + a : 700 + (a % 2 === b % 2 ? P[a % 2]!.length : 0);
      expect(r.sharing.bytes[a]![b], `${a},${b}`).toBe(want);
    }
    expect(r.images[5]).toMatchObject({ uniqueContents: 1, uniqueBytes: 105 });
    const text = formatReport(r);
    expect(text).toContain('Most file content shared between two images');
    expect(text).toMatch(/\n\s*\d+\s+img-\d+\s+\d+\s+img-\d+\s+1\.2 KiB\n/); // an odd pair: S + P1 = 1200 bytes
    expect(renderSvg(r).match(/<rect [^>]*><title>/g)!.length).toBeGreaterThanOrEqual(n * n);
  });

  it('refuses a hostile tar entry as gear convert does, naming the image', async () => {
    const evil = join(work, 'evil');
    await writeOciImage(evil, [[{ path: 'ok', content: 'fine' }, { path: '../escape', content: 'out' }]]);
    await expect(analyzeImages([{ name: 'evil-image', open: () => openOciLayout(evil) }])).rejects.toThrow(/evil-image: .*path traversal/);
  });

  it('refuses a layer that does not match its digest, naming the image', async () => {
    const bad = join(work, 'bad');
    await writeOciImage(bad, [L1], { corruptLayer: (_i, b) => Buffer.concat([b, Buffer.from('junk')]) });
    await expect(analyzeImages([{ name: 'bad-image', open: () => openOciLayout(bad) }])).rejects.toThrow(/bad-image: .*more than the declared/);
  });
});
