/**
 * Scale benchmark (bench/scale/million.sh): GEAR_SCALE_FILES files (default
 * 1,000,000) in one image, end to end. Not a test of speed: it records wall
 * times and peak RSS (VmHWM from /proc/PID/status, polled while the process
 * runs) of the converter and the gear daemon, and checks that the container
 * sees every file.
 *
 * The image: busybox-static, plus one layer generated as a tar stream (no
 * real filesystem): m/dNNNN/fNNNN, 1,000 files per directory; every 4th file
 * holds one of 8 short contents, the others are empty.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { once } from 'node:events';
import { join } from 'node:path';
import { createGzip, gzipSync } from 'node:zlib';
import { execFileSync } from 'node:child_process';
import { afterAll, expect, it } from 'vitest';
import { encodeTarHeader, tarPadding, tarTrailer, type TarHeader } from '../../src/core/index/tar.js';
import { GEAR_CLI, REPO_ROOT, startDockerd, type Dockerd } from '../../test/helpers/dockerd.js';
import { busyboxLayer, imageConfig, layerTar, sha256 } from '../../test/helpers/oci-images.js';
import { startRegistry, type TestRegistry } from '../../test/helpers/registry.js';
import { indexTarHeader } from '../../test/unit/fixtures/tarbuild.js';

const FILES = Number(process.env.GEAR_SCALE_FILES ?? 1_000_000);
const PER_DIR = 1000;
const DIRS = Math.ceil(FILES / PER_DIR);
const CONTENTS = Array.from({ length: 8 }, (_, i) => Buffer.from(`content ${i}\n`));

let work: string | undefined;
let reg: TestRegistry | undefined;
let d: Dockerd | undefined;
afterAll(async () => {
  await d?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

const say = (m: string) => process.stderr.write(`[scale] ${new Date().toISOString().slice(11, 19)} ${m}\n`);

/** VmHWM (peak RSS) of a live process in bytes, or undefined when it is gone. */
function vmHwm(pid: number): number | undefined {
  try {
    const m = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}
function vmRss(pid: number): number | undefined {
  try {
    const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

const hdr = (path: string, type: TarHeader['type'], size = 0): TarHeader => indexTarHeader(path, type, { size });

/** The generated layer as tar+gzip in `file`; returns diff_id, digest, size. */
async function writeFilesLayer(file: string): Promise<{ diffId: string; digest: string; size: number; withContent: number }> {
  const diff = createHash('sha256');
  const comp = createHash('sha256');
  let size = 0;
  const gz = createGzip({ level: 1 });
  const out = createWriteStream(file);
  gz.on('data', (c: Buffer) => {
    comp.update(c);
    size += c.length;
  });
  gz.pipe(out);
  let batch: Buffer[] = [];
  let bytes = 0;
  const put = async (b: Buffer) => {
    batch.push(b);
    bytes += b.length;
    if (bytes >= 1 << 20) await flush();
  };
  const flush = async () => {
    const b = Buffer.concat(batch);
    batch = [];
    bytes = 0;
    diff.update(b);
    if (!gz.write(b)) await once(gz, 'drain');
  };
  let withContent = 0;
  await put(encodeTarHeader(hdr('m/', 'dir')));
  let n = 0;
  for (let i = 0; i < DIRS; i++) {
    const dir = `m/d${String(i).padStart(4, '0')}`;
    await put(encodeTarHeader(hdr(`${dir}/`, 'dir')));
    for (let j = 0; j < PER_DIR && n < FILES; j++, n++) {
      const p = `${dir}/f${String(j).padStart(4, '0')}`;
      if (j % 4 === 0) {
        const c = CONTENTS[(i + j) % CONTENTS.length]!;
        await put(Buffer.concat([encodeTarHeader(hdr(p, 'file', c.length)), c, tarPadding(c.length)]));
        withContent++;
      } else await put(encodeTarHeader(hdr(p, 'file')));
    }
  }
  await put(tarTrailer());
  await flush();
  gz.end();
  await once(out, 'close');
  return { diffId: `sha256:${diff.digest('hex')}`, digest: `sha256:${comp.digest('hex')}`, size, withContent };
}

/** An OCI layout with busybox and the generated layer. */
async function writeSource(dir: string): Promise<{ withContent: number }> {
  const blobs = join(dir, 'blobs', 'sha256');
  mkdirSync(blobs, { recursive: true });
  const put = (b: Buffer) => {
    const digest = sha256(b);
    writeFileSync(join(blobs, digest.slice(7)), b);
    return { digest, size: b.length };
  };
  const bbTar = await layerTar(await busyboxLayer());
  const bb = put(gzipSync(bbTar));
  const tmp = join(dir, 'files-layer.tmp');
  const files = await writeFilesLayer(tmp);
  renameSync(tmp, join(blobs, files.digest.slice(7)));
  const cfg = put(imageConfig([sha256(bbTar), files.diffId]));
  const manifest = put(
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg },
        layers: [
          { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...bb },
          { mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: files.digest, size: files.size },
        ],
      }),
    ),
  );
  writeFileSync(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  writeFileSync(
    join(dir, 'index.json'),
    JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...manifest, annotations: { 'org.opencontainers.image.ref.name': 'latest' } }] }),
  );
  say(`source layer: ${FILES} files (${files.withContent} with content), ${(files.size / 1e6).toFixed(1)} MB gzip`);
  return { withContent: files.withContent };
}

/** Runs the converter as its own process, polling its VmHWM. */
async function convert(src: string, ref: string): Promise<{ seconds: number; peakRss: number; stdout: string }> {
  const t0 = performance.now();
  const child = spawn(process.execPath, [GEAR_CLI, 'convert', '--no-progress', `oci:${src}`, ref], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-20_000)));
  let peak = 0;
  const poll = setInterval(() => (peak = Math.max(peak, vmHwm(child.pid!) ?? 0)), 100);
  const kill = setTimeout(() => child.kill('SIGKILL'), 3_600_000);
  const [code] = (await once(child, 'exit')) as [number | null];
  clearInterval(poll);
  clearTimeout(kill);
  if (code !== 0) throw new Error(`gear convert exited ${code}: ${stderr}`);
  return { seconds: (performance.now() - t0) / 1000, peakRss: peak, stdout };
}

/** Calls fn while polling pid's VmHWM every 100 ms. */
async function watched<T>(pid: number, fn: () => Promise<T>): Promise<{ value: T; seconds: number; peakRss: number }> {
  let peak = vmHwm(pid) ?? 0;
  const poll = setInterval(() => (peak = Math.max(peak, vmHwm(pid) ?? 0)), 100);
  const t0 = performance.now();
  try {
    const value = await fn();
    peak = Math.max(peak, vmHwm(pid) ?? 0);
    return { value, seconds: (performance.now() - t0) / 1000, peakRss: peak };
  } finally {
    clearInterval(poll);
  }
}

const MB = (b: number) => Math.round(b / 1e5) / 10;

it(`${FILES.toLocaleString('en')} files: convert, pull on gear, run ls and find`, async () => {
  work = mkdtempSync('/tmp/gear-scale-');
  const t0 = performance.now();
  const { withContent } = await writeSource(join(work, 'src'));
  const generateSeconds = (performance.now() - t0) / 1000;
  reg = await startRegistry();
  const ref = `${reg.host}/scale/million:gear`;
  say('converting');
  const conv = await convert(join(work, 'src'), ref);
  say(`converted in ${conv.seconds.toFixed(1)} s, converter peak RSS ${MB(conv.peakRss)} MB`);

  d = await startDockerd({ driver: 'gear' });
  const gearPid = d.gearPid!()!;
  const dockerdPid = Number(readFileSync(join(d.dir, 'd.pid'), 'utf8'));
  const gearIdle = vmRss(gearPid) ?? 0;
  say('pulling');
  const pull = await watched(gearPid, () => d!.dockerOk(['pull', ref], { timeoutMs: 3_600_000 }));
  const dockerdAfterPull = vmHwm(dockerdPid) ?? 0;
  say(`pulled in ${pull.seconds.toFixed(1)} s, gear daemon peak RSS ${MB(pull.peakRss)} MB`);
  const gearAfterPullRss = vmRss(gearPid) ?? 0;

  const script = 'ls /m | wc -l; ls /m/d0000 | wc -l; find /m | wc -l; cat /m/d0000/f0000; cat /m/d0000/f0004';
  const runR = await watched(gearPid, () => d!.dockerOk(['run', '--rm', ref, 'sh', '-c', script], { timeoutMs: 3_600_000 }));
  const lines = runR.value.stdout.trim().split('\n');
  say(`ran in ${runR.seconds.toFixed(1)} s: ${lines.join(' | ')}`);
  expect(lines.slice(0, 3).map(Number)).toEqual([DIRS, Math.min(PER_DIR, FILES), FILES + DIRS + 1]);
  expect(lines.slice(3)).toEqual([CONTENTS[0]!.toString().trim(), CONTENTS[4]!.toString().trim()]);

  const indexImage = (() => {
    try {
      return Number(execFileSync('sh', ['-c', `du -b ${d!.gearRoot}/layers/*/index.erofs 2>/dev/null | sort -n | tail -1 | cut -f1`]).toString().trim() || 0);
    } catch {
      return 0;
    }
  })();
  const result = {
    files: FILES,
    filesWithContent: withContent,
    distinctContents: CONTENTS.length + 0,
    generateSeconds,
    convert: { seconds: conv.seconds, peakRssBytes: conv.peakRss, summary: conv.stdout.trim().split('\n').slice(-12) },
    pull: { seconds: pull.seconds, gearPeakRssBytes: pull.peakRss, gearIdleRssBytes: gearIdle, gearRssAfterPullBytes: gearAfterPullRss, dockerdPeakRssBytes: dockerdAfterPull },
    run: { seconds: runR.seconds, gearPeakRssBytes: runR.peakRss, output: lines },
    indexImageBytes: indexImage,
    host: { cpus: (await import('node:os')).cpus().length, memBytes: (await import('node:os')).totalmem(), kernel: (await import('node:os')).release() },
  };
  const sha = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: REPO_ROOT }).toString().trim();
  const stamp = new Date().toISOString().replace(/[-:]/g, '').replace('T', '-').slice(0, 15);
  const out = join(REPO_ROOT, 'bench', 'results', `scale-${FILES}-${stamp}-${sha}.json`);
  writeFileSync(out, `${JSON.stringify(result, null, 2)}\n`);
  console.log(JSON.stringify(result, null, 2));
  say(`wrote ${out} (${statSync(out).size} bytes)`);
});
