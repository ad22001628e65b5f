/**
 * `gear analyze` against what `gear convert` really uploads to a real
 * registry (Debian docker-registry 2.8), both run as the CLI with --json:
 *
 *   1. oci:minbase         the debootstrap minbase rootfs, one gzip layer
 *   2. REGISTRY/src/app:v1 minbase + a layer (a 9 MiB compressible file, which
 *                          convert stores raw, a copy of busybox and a file of
 *                          minbase's again), pushed to the registry as a plain image
 *   3. docker-archive:bb   busybox, a legacy `docker save` archive (plain tar)
 *
 * Every image is converted into one repository of the registry, one after the
 * other: the sum of what convert reports uploading (bytes and blobs) must be
 * what analyze predicts, and each image's file counts must agree.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AnalyzeReport } from '../../src/analyze/report.js';
import { fileBlobSource, RegistryClient } from '../../src/core/registry/client.js';
import { ensureMinbaseTar, busyboxLayer } from '../helpers/images.js';
import { layerTar, writeDockerArchive, writeOciImage } from '../helpers/oci-images.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const exec = promisify(execFile);
const GEAR_CLI = join(import.meta.dirname, '../../dist/cli/gear.js');

let reg: TestRegistry;
let work: string;
let images: string[];

interface ConvertJson {
  files: number;
  uniqueContents: number;
  bytesUploaded: number;
  blobsUploaded: number;
  bytesSkipped: number;
  indexSize: number;
  seconds: number;
}

/** Pushes the image of an OCI layout to the registry as it is (a plain, non-Gear image). */
async function pushLayout(dir: string, ref: string): Promise<void> {
  const client = new RegistryClient();
  try {
    const index = JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8'));
    const blob = (d: string) => join(dir, 'blobs/sha256', d.slice(7));
    const manifest = readFileSync(blob(index.manifests[0].digest));
    const m = JSON.parse(manifest.toString('utf8'));
    const repo = ref.slice(0, ref.lastIndexOf(':'));
    for (const d of [m.config, ...m.layers]) await client.pushBlob(repo, d.digest, fileBlobSource(blob(d.digest), statSync(blob(d.digest)).size));
    await client.putManifest(ref, manifest);
  } finally {
    await client.close();
  }
}

beforeAll(async () => {
  reg = await startRegistry();
  work = mkdtempSync('/tmp/gear-analyze-it-');
  const minbase = readFileSync(await ensureMinbaseTar());
  const busybox = await busyboxLayer();
  await writeOciImage(join(work, 'minbase'), [minbase]);
  const extra = await layerTar([
    { path: 'opt/big.dat', content: Buffer.alloc(9 * 1024 * 1024, 'z') },
    { path: 'opt/busybox', content: readFileSync('/bin/busybox'), mode: 0o755 },
    { path: 'opt/again', content: readFileSync('/bin/busybox'), mode: 0o755 },
  ]);
  await writeOciImage(join(work, 'app'), [minbase, extra]);
  await pushLayout(join(work, 'app'), `${reg.host}/src/app:v1`);
  await writeDockerArchive(join(work, 'bb.tar'), [busybox]);
  images = [`oci:${join(work, 'minbase')}`, `${reg.host}/src/app:v1`, `docker-archive:${join(work, 'bb.tar')}`];
}, 900_000);

afterAll(async () => {
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

async function gear(args: string[]): Promise<{ stdout: string; stderr: string; seconds: number }> {
  const t0 = Date.now();
  const r = await exec(process.execPath, [GEAR_CLI, ...args], { maxBuffer: 64 << 20 });
  return { ...r, seconds: (Date.now() - t0) / 1000 };
}

describe('gear analyze against gear convert and a registry', () => {
  let report: AnalyzeReport;
  let analyzeSeconds: number;

  it('analyzes registry, oci: and docker-archive: images and writes the plot', async () => {
    const r = await gear(['analyze', '--json', '--no-progress', '--chunks', '1MiB', '--location', `${reg.host}/gear/all`, '--plot', join(work, 'plot.png'), ...images]);
    analyzeSeconds = r.seconds;
    report = JSON.parse(r.stdout) as AnalyzeReport;
    expect(report.images.map((i) => i.name)).toEqual(images);
    // minbase's layer is shared by the first two images, and so is all of its file content.
    expect(report.layers.distinct).toBe(3);
    expect(report.layers.shared).toBe(1);
    expect(report.sharing.bytes[0]![1]).toBe(report.images[0]!.distinctBytes);
    // The busybox binary is in app and in the busybox image; app holds it twice.
    expect(report.sharing.bytes[1]![2]).toBeGreaterThanOrEqual(statSync('/bin/busybox').size);
    expect(report.images[1]!.duplicateBytes).toBeGreaterThanOrEqual(statSync('/bin/busybox').size);
    // The 9 MiB file is stored raw though it compresses to nearly nothing (in its layer too).
    expect(report.files.storedBytes).toBeGreaterThan(9 * 1024 * 1024);
    // storage.gear (files + index + configs) is checked against what gear convert really uploads, in the next test.
    expect(report.chunks!.distinctBytes).toBeLessThanOrEqual(report.files.distinctBytes);
    const png = readFileSync(join(work, 'plot.png'));
    expect(png.subarray(1, 4).toString('latin1')).toBe('PNG');
    expect(png.length).toBeGreaterThan(10_000);
    process.stderr.write(`[analyze] ${images.length} images in ${analyzeSeconds.toFixed(1)} s: ${report.images.map((i) => `${i.seconds.toFixed(1)} s`).join(', ')}\n`);
  });

  it('predicts what gear convert uploads into one repository, image by image', async () => {
    let bytes = 0;
    let blobs = 0;
    let convertSeconds = 0;
    for (let i = 0; i < images.length; i++) {
      const r = await gear(['convert', '--json', '--no-progress', '--format-version', '2', '--tmp-dir', work, images[i]!, `${reg.host}/gear/all:img${i}`]);
      convertSeconds += r.seconds;
      const s = JSON.parse(r.stdout) as ConvertJson;
      const im = report.images[i]!;
      expect(s.files, images[i]).toBe(im.files);
      expect(s.uniqueContents, images[i]).toBe(im.distinctContents);
      expect(s.indexSize, images[i]).toBe(im.gear.indexBytes);
      // The first conversion goes to an empty repository: all of it is uploaded.
      if (i === 0) expect(s.bytesUploaded).toBe(im.gear.totalBytes);
      bytes += s.bytesUploaded;
      blobs += s.blobsUploaded;
    }
    expect(bytes).toBe(report.storage.gear.totalBytes);
    expect(blobs).toBe(report.storage.gear.blobs);
    process.stderr.write(`[analyze] analyze ${analyzeSeconds.toFixed(1)} s, convert ${convertSeconds.toFixed(1)} s, predicted = uploaded = ${bytes} bytes in ${blobs} blobs\n`);
  });
});
