// Benchmark driver for bench/convert.sh (plain ESM over dist/, so it runs on Node 20 without a TS loader).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const MINBASE = join(process.env.GEAR_TEST_CACHE ?? '/var/cache/gear-test', 'minbase-bookworm.tar');
const REPO = new URL('..', import.meta.url).pathname;
const GEAR = join(REPO, 'dist/cli/gear.js');
if (!existsSync(MINBASE)) {
  console.error(`bench: ${MINBASE} missing (built by the integration harness); nothing to measure`);
  process.exit(2);
}
const work = mkdtempSync(join(tmpdir(), 'gear-bench-'));
const children = [];
const sha = (b) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const mb = (n) => (n / 1e6).toFixed(1);

function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

async function startRegistry(name) {
  const root = join(work, name);
  mkdirSync(root);
  const port = await freePort();
  writeFileSync(
    join(root, 'config.yml'),
    `version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${root}/data\nhttp:\n  addr: 127.0.0.1:${port}\n`,
  );
  const child = spawn('/usr/bin/docker-registry', ['serve', join(root, 'config.yml')], { stdio: 'ignore' });
  children.push(child);
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/v2/`)).status === 200) return { host: `127.0.0.1:${port}`, root };
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`registry ${name} did not start`);
}

function du(dir) {
  let n = 0;
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) n += statSync(p).size;
    }
  };
  if (existsSync(dir)) walk(dir);
  return n;
}

/** An OCI layout holding one image of gzip layers (gzip -6 -n, as docker push would). */
function ociImage(dir, tag, tars) {
  const blobs = join(dir, 'blobs/sha256');
  mkdirSync(blobs, { recursive: true });
  const put = (b) => {
    const d = sha(b);
    writeFileSync(join(blobs, d.slice(7)), b);
    return { digest: d, size: b.length };
  };
  const layers = [];
  const diffIds = [];
  for (const t of tars) {
    const raw = readFileSync(t);
    diffIds.push(sha(raw));
    const gz = execFileSync('gzip', ['-6', '-n', '-c', t], { maxBuffer: 1 << 30 });
    layers.push({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...put(gz) });
  }
  const cfg = put(Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', config: { Cmd: ['/bin/bash'] }, rootfs: { type: 'layers', diff_ids: diffIds } })));
  const m = put(Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.manifest.v1+json', config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg }, layers })));
  writeFileSync(join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
  const idx = existsSync(join(dir, 'index.json')) ? JSON.parse(readFileSync(join(dir, 'index.json'), 'utf8')) : { schemaVersion: 2, manifests: [] };
  idx.manifests.push({ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...m, annotations: { 'org.opencontainers.image.ref.name': tag } });
  writeFileSync(join(dir, 'index.json'), JSON.stringify(idx));
}

/**
 * `bench/convert.sh --images [NAME…]`: conversion throughput of the cached bench images
 * (/var/cache/gear-test/NAME-bookworm.tar, default python3 and nodejs), each a one-layer OCI image
 * (gzip -6), converted with format version 3 into a fresh repository of a local registry:
 * wall time and CPU (user+sys of gear convert, from /usr/bin/time), MB/s of uncompressed input;
 * then the same conversion again (reuse: nothing uploaded) and, with --with-v2, format 2 for comparison.
 */
async function imagesMode() {
  const names = process.argv.slice(process.argv.indexOf('--images') + 1).filter((a) => !a.startsWith('--'));
  const cache = process.env.GEAR_TEST_CACHE ?? '/var/cache/gear-test';
  const reg = await startRegistry('images');
  const oci = join(work, 'oci-images');
  console.log(`machine load at the start: ${readFileSync('/proc/loadavg', 'utf8').trim()} (${execFileSync('nproc').toString().trim()} cores)`);
  console.log('image      format  run      input(MB)  files  wall(s)  cpu(s)  MB/s(wall)  MB/s(per cpu-s x2)  uploaded(MB)  packs(new/reused)');
  const rows = [];
  for (const name of names.length ? names : ['python3', 'nodejs']) {
    const tar = join(cache, `${name}-bookworm.tar`);
    if (!existsSync(tar)) {
      console.log(`${name}: ${tar} missing; skipped`);
      continue;
    }
    ociImage(oci, name, [tar]);
    const runs = [['3', 'first', `bench/${name}:v3`], ['3', 'again', `bench/${name}:v3`]];
    if (process.argv.includes('--with-v2')) runs.push(['2', 'first', `bench/${name}:v2`]);
    for (const [fv, run, dst] of runs) {
      const t0 = Date.now();
      const p = spawnSync('/usr/bin/time', ['-f', 'cpu %U %S', 'node', GEAR, 'convert', '--json', '--no-progress', '--format-version', fv, `oci:${oci}:${name}`, `${reg.host}/${dst}`], { maxBuffer: 1 << 26 });
      if (p.status !== 0) throw new Error(`gear convert ${name} (format ${fv}) failed: ${p.stderr}`);
      const wall = (Date.now() - t0) / 1000;
      const s = JSON.parse(p.stdout.toString());
      const cpu = /cpu ([0-9.]+) ([0-9.]+)/.exec(p.stderr.toString());
      const r = { name, fv, run, input: s.layerBytes, files: s.files, wall, cpu: cpu ? Number(cpu[1]) + Number(cpu[2]) : NaN, seconds: s.seconds, uploaded: s.bytesUploaded, v3: s.v3 };
      rows.push(r);
    }
  }
  return rows;
}

try {
  if (process.argv.includes('--images')) {
    const rows = await imagesMode();
    for (const r of rows) {
      const v3 = r.v3 ? `${r.v3.newPacks}/${r.v3.reusedPacks}` : '-';
      console.log(
        `${r.name.padEnd(10)} ${r.fv.padStart(6)}  ${r.run.padEnd(6)} ${mb(r.input).padStart(10)} ${String(r.files).padStart(6)} ${r.wall.toFixed(1).padStart(8)} ${r.cpu.toFixed(1).padStart(7)} ${(r.input / 1e6 / r.wall).toFixed(1).padStart(11)} ${((2 * r.input) / 1e6 / r.cpu).toFixed(1).padStart(19)} ${mb(r.uploaded).padStart(13)}  ${v3}`,
      );
    }
    console.log(`machine load at the end: ${readFileSync('/proc/loadavg', 'utf8').trim()}`);
    process.exitCode = 0;
  } else {
  // Layers: python3 from the host, and an update layer.
  const pyDirs = readdirSync('/usr/lib').filter((d) => /^python3(\.\d+)?$/.test(d)).map((d) => `usr/lib/${d}`);
  const pyBins = readdirSync('/usr/bin').filter((d) => /^python3(\.\d+)?$/.test(d)).map((d) => `usr/bin/${d}`);
  const l2 = join(work, 'python3.tar');
  execFileSync('tar', ['--numeric-owner', '--sort=name', '-C', '/', '-cf', l2, ...pyDirs, ...pyBins]);
  const upd = join(work, 'update');
  const changed = execFileSync('bash', ['-c', `cd / && find ${pyDirs.join(' ')} -name '*.py' -type f | sort | awk 'NR % 20 == 0'`], { maxBuffer: 1 << 26 })
    .toString()
    .split('\n')
    .filter(Boolean);
  for (const f of changed) {
    mkdirSync(join(upd, f, '..'), { recursive: true });
    writeFileSync(join(upd, f), Buffer.concat([readFileSync(join('/', f)), Buffer.from('\n# patched by the update layer\n')]));
  }
  const perl = ['usr/share/perl', 'usr/lib/x86_64-linux-gnu/perl'].filter((d) => existsSync(join('/', d)));
  const l3 = join(work, 'update.tar');
  execFileSync('tar', ['--numeric-owner', '--sort=name', '-cf', l3, '-C', upd, '.', ...perl.flatMap((d) => ['-C', '/', d])]);

  const oci = join(work, 'oci');
  const images = [
    ['a', [MINBASE]],
    ['b', [MINBASE, l2]],
    ['c', [MINBASE, l2, l3]],
  ];
  for (const [tag, tars] of images) ociImage(oci, tag, tars);
  const docker = await startRegistry('docker');
  const gear = await startRegistry('gear');

  // gear analyze over the same images: its table and plot, its time, and (below) its prediction vs what convert uploads.
  const plot = process.env.GEAR_BENCH_PLOT ?? join(tmpdir(), 'gear-bench-analyze.png');
  const ta = Date.now();
  const analyzeArgs = [GEAR, 'analyze', '--no-progress', '--location', `${gear.host}/bench/img`, '--plot', plot, ...images.map(([tag]) => `oci:${oci}:${tag}`)];
  console.log(execFileSync('node', analyzeArgs, { maxBuffer: 1 << 26 }).toString().trimEnd());
  const analyzeWall = (Date.now() - ta) / 1000;
  const predicted = JSON.parse(execFileSync('node', [...analyzeArgs.filter((a) => a !== plot && a !== '--plot'), '--json'], { maxBuffer: 1 << 26 }).toString());
  console.log(`gear analyze: ${images.length} images in ${analyzeWall.toFixed(1)} s (plot: ${plot})`);
  // `bench/convert.sh --analyze-only`: the analysis alone (registries and the work dir still cleaned up by finally).
  converting: {
    if (process.argv.includes('--analyze-only')) break converting;

    const rows = [];
    for (const [tag, tars] of images) {
      const uncompressed = tars.reduce((s, t) => s + statSync(t).size, 0);
      execFileSync('skopeo', ['copy', '-q', '--dest-tls-verify=false', `oci:${oci}:${tag}`, `docker://${docker.host}/bench/img:${tag}`]);
      const t0 = Date.now();
      const out = execFileSync('node', [GEAR, 'convert', '--json', '--no-progress', '--concurrency', '8', `oci:${oci}:${tag}`, `${gear.host}/bench/img:${tag}`], { maxBuffer: 1 << 26 });
      const s = JSON.parse(out.toString());
      rows.push({ tag, uncompressed, ...s, wall: (Date.now() - t0) / 1000 });
    }
    // Flatten + gzip cost without the registry (OCI layout destination), to separate converter CPU from registry overhead.
    const t1 = Date.now();
    const local = JSON.parse(execFileSync('node', [GEAR, 'convert', '--json', '--no-progress', `oci:${oci}:c`, `oci:${join(work, 'local')}:c`], { maxBuffer: 1 << 26 }).toString());
    const localWall = (Date.now() - t1) / 1000;
    const t2 = Date.now();
    const localRaw = JSON.parse(execFileSync('node', [GEAR, 'convert', '--json', '--no-progress', '--storage', 'raw', `oci:${oci}:c`, `oci:${join(work, 'local-raw')}:c`], { maxBuffer: 1 << 26 }).toString());
    const localRawWall = (Date.now() - t2) / 1000;

    const dockerBytes = du(join(docker.root, 'data/docker/registry/v2/blobs'));
    const gearBytes = du(join(gear.root, 'data/docker/registry/v2/blobs'));
    console.log('image  layers(MB,uncompressed)  files  unique  logical(MB)  uploaded(MB)  skipped(MB)  index(KB)  convert(s)  MB/s');
    for (const r of rows) {
      console.log(
        `${r.tag.padEnd(6)} ${mb(r.uncompressed).padStart(10)} ${String(r.files).padStart(19)} ${String(r.uniqueContents).padStart(7)} ${mb(r.logicalBytes).padStart(12)} ${mb(r.bytesUploaded).padStart(13)} ${mb(r.bytesSkipped).padStart(12)} ${(r.indexSize / 1e3).toFixed(0).padStart(10)} ${r.seconds.toFixed(1).padStart(11)} ${(r.layerBytes / 1e6 / r.seconds).toFixed(1).padStart(5)}`,
      );
    }
    console.log(`to an OCI layout (no registry), image c, gzip-when-worth-it: ${localWall.toFixed(1)} s, ${(local.layerBytes / 1e6 / local.seconds).toFixed(1)} MB/s; raw: ${localRawWall.toFixed(1)} s, ${(localRaw.layerBytes / 1e6 / localRaw.seconds).toFixed(1)} MB/s; stored ${mb(local.bytesUploaded)} vs ${mb(localRaw.bytesUploaded)} MB`);
    console.log(`registry storage for images a+b+c: Docker (gzip layers) ${mb(dockerBytes)} MB, Gear ${mb(gearBytes)} MB, ratio Gear/Docker ${(gearBytes / dockerBytes).toFixed(3)} (${((1 - gearBytes / dockerBytes) * 100).toFixed(1)}% less)`);
    const uploaded = rows.reduce((n, r) => n + r.bytesUploaded, 0);
    console.log(`gear analyze predicted ${predicted.storage.gear.totalBytes} bytes of Gear blobs, convert uploaded ${uploaded} (${predicted.storage.gear.totalBytes === uploaded ? 'equal' : 'DIFFERENT'}); analyze ${analyzeWall.toFixed(1)} s vs convert ${rows.reduce((n, r) => n + r.wall, 0).toFixed(1)} s`);
    console.log(`machine load at the end: ${readFileSync('/proc/loadavg', 'utf8').trim()}`);
  }
  }
} finally {
  for (const c of children) c.kill('SIGTERM');
  await new Promise((r) => setTimeout(r, 500));
  rmSync(work, { recursive: true, force: true });
}
