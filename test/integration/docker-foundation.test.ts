/**
 * The storage driver as a Docker user sees it: a private dockerd running on
 * Gear (`-s gear-<hex>`, unmanaged plugin) does everything a user does with
 * overlay2: pull/push, run, exec, file changes, diff, commit, build, save/load,
 * cp, export, rm/rmi/prune, a daemon restart, and a 125-layer image (Docker's maximum).
 *
 * GEAR_TEST_DRIVER=overlay2 runs the same suite on Docker's overlay2 (the
 * reference; useful to tell a test bug from a driver bug).
 */
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDockerd, type Dockerd, type Driver } from '../helpers/dockerd.js';
import {
  BUSYBOX_TAG,
  LAYERED_CHECK,
  LAYERED_DOCKERFILE,
  LAYERED_FILES,
  LAYERED_ARCHIVE_CHECK,
  expectedLayeredArchiveOutput,
  expectedLayeredOutput,
  importBusybox,
  importMinbase,
  ensureMinbaseTar,
  loadLayeredImage,
  MINBASE_TAG,
  buildImage,
} from '../helpers/images.js';
import { startRegistry, type TestRegistry as Registry } from '../helpers/registry.js';
import { mountPointsUnder } from '../helpers/proc.js';

const DRIVER = (process.env.GEAR_TEST_DRIVER ?? 'gear') as Driver;

const MANIFEST_TYPES = [
  'application/vnd.docker.distribution.manifest.v2+json',
  'application/vnd.oci.image.manifest.v1+json',
].join(', ');

interface Manifest {
  config: { digest: string };
  layers: Array<{ digest: string; size: number; mediaType: string }>;
}

async function registryManifest(reg: Registry, repo: string, ref: string): Promise<{ digest: string; manifest: Manifest }> {
  const res = await fetch(`${reg.url}/v2/${repo}/manifests/${ref}`, { headers: { Accept: MANIFEST_TYPES } });
  const body = Buffer.from(await res.arrayBuffer());
  expect(res.status, `GET manifest ${repo}:${ref}: ${body.toString().slice(0, 300)}`).toBe(200);
  const digest = res.headers.get('docker-content-digest') ?? '';
  expect(digest).toBe(`sha256:${createHash('sha256').update(body).digest('hex')}`);
  return { digest, manifest: JSON.parse(body.toString()) as Manifest };
}

async function registryBlob(reg: Registry, repo: string, digest: string): Promise<Buffer> {
  const res = await fetch(`${reg.url}/v2/${repo}/blobs/${digest}`);
  const body = Buffer.from(await res.arrayBuffer());
  expect(res.status, `GET blob ${repo}@${digest}`).toBe(200);
  return body;
}

const sha = (b: Buffer | string) => 'sha256:' + createHash('sha256').update(b).digest('hex');

async function diffIds(d: Dockerd, image: string): Promise<string[]> {
  const r = await d.dockerOk(['image', 'inspect', '-f', '{{json .RootFS.Layers}}', image]);
  return JSON.parse(r.stdout) as string[];
}

/** docker diff output as a sorted list of lines. */
async function dockerDiff(d: Dockerd, container: string): Promise<string[]> {
  const r = await d.dockerOk(['diff', container]);
  return r.stdout.split('\n').filter(Boolean).sort();
}

interface TarEntryInfo {
  type: string;
  mode: number;
  size: number;
  linkname?: string;
  sha?: string;
}

/** Reads a tar file into path -> entry info (with content sha256 of regular files). */
async function readTar(file: string, wantContent = true): Promise<Map<string, TarEntryInfo & { data?: Buffer }>> {
  const out = new Map<string, TarEntryInfo & { data?: Buffer }>();
  const ex = tar.extract();
  const done = new Promise<void>((resolve, reject) => {
    ex.on('entry', (h, stream, next) => {
      const chunks: Buffer[] = [];
      stream.on('data', (c: unknown) => chunks.push(c as Buffer));
      stream.on('end', () => {
        const data = Buffer.concat(chunks);
        out.set(h.name.replace(/^\.?\//, '').replace(/\/$/, ''), {
          type: h.type ?? 'file',
          mode: (h.mode ?? 0) & 0o7777,
          size: h.size ?? 0,
          linkname: h.linkname ?? undefined,
          sha: h.type === 'file' ? sha(data) : undefined,
          data: wantContent && data.length < 4_000_000 ? data : undefined,
        });
        next();
      });
      stream.on('error', reject);
    });
    ex.on('finish', () => resolve());
    ex.on('error', reject);
  });
  createReadStream(file).pipe(ex);
  await done;
  return out;
}

/** Image layer dirs the driver still keeps on disk. */
function driverLayerDirs(d: Dockerd): string[] {
  if (d.driver === 'overlay2') {
    const p = join(d.dataRoot, 'overlay2');
    return existsSync(p) ? readdirSync(p).filter((n) => n !== 'l') : [];
  }
  const p = join(d.gearRoot!, 'layers');
  return existsSync(p) ? readdirSync(p).filter((n) => !n.startsWith('.')) : [];
}

function overlayMountsUnder(dir: string): string[] {
  const text = readFileSync('/proc/self/mountinfo', 'utf8');
  const points = new Set(mountPointsUnder(dir));
  return text
    .split('\n')
    .filter((l) => l.includes(' - overlay '))
    .map((l) => l.split(' ')[4]!)
    .filter((p) => points.has(p));
}

describe(`docker on ${DRIVER}: the foundation`, () => {
  let d: Dockerd;
  let reg: Registry;
  let reg2: Registry;
  let work: string;

  beforeAll(async () => {
    work = mkdtempSync('/tmp/gft-');
    // The debootstrap cache (first run on a machine only: a few minutes, progress on stderr).
    await ensureMinbaseTar();
    reg = await startRegistry();
    reg2 = await startRegistry();
    d = await startDockerd({ driver: DRIVER, verbose: !!process.env.GEAR_TEST_VERBOSE });
    await importBusybox(d);
  });

  afterAll(async () => {
    await d?.stop();
    await reg?.stop();
    await reg2?.stop();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('dockerd runs on the requested storage driver', async () => {
    const r = await d.dockerOk(['info', '-f', '{{.Driver}}']);
    expect(r.stdout.trim()).toBe(d.storageDriver);
    const c = await d.dockerOk(['image', 'inspect', '-f', '{{.GraphDriver.Name}}', BUSYBOX_TAG]);
    expect(c.stdout.trim()).toBe(d.storageDriver);
  });

  it('runs a container and passes its output and exit code through', async () => {
    const r = await d.dockerOk(['run', '--rm', BUSYBOX_TAG, 'sh', '-c', 'echo hello; cat /etc/passwd | head -1']);
    expect(r.stdout).toBe('hello\nroot:x:0:0:root:/root:/bin/sh\n');
    const f = await d.docker(['run', '--rm', BUSYBOX_TAG, 'sh', '-c', 'exit 7']);
    expect(f.code).toBe(7);
  });

  it('writes, modifies, deletes, chmods and renames inside a container; docker diff, exec and commit see them', async () => {
    await d.dockerOk(['run', '-d', '--name', 'ops', BUSYBOX_TAG, 'sleep', '3600']);
    const script = [
      'set -e',
      'echo new > /tmp/new',
      'echo extra >> /etc/passwd',
      'rm /etc/group',
      'chmod 0600 /etc/passwd',
      'mkdir -p /srv/dir/sub && echo in > /srv/dir/sub/f',
      'mv /var/log /var/logs',
      'mv /srv/dir /srv/moved',
      'rm /bin/vi',
      'ln -s /tmp/new /root/link',
    ].join('\n');
    await d.dockerOk(['exec', 'ops', 'sh', '-c', script]);
    const seen = await d.dockerOk([
      'exec', 'ops', 'sh', '-c',
      'cat /tmp/new; tail -1 /etc/passwd; stat -c %a /etc/passwd; test ! -e /etc/group && echo nogroup; cat /srv/moved/sub/f; test -d /var/logs && test ! -e /var/log && echo renamed; readlink /root/link',
    ]);
    expect(seen.stdout).toBe('new\nextra\n600\nnogroup\nin\nrenamed\n/tmp/new\n');
    const diff = await dockerDiff(d, 'ops');
    expect(diff).toEqual(
      [
        'A /root/link',
        'A /srv',
        'A /srv/moved',
        'A /srv/moved/sub',
        'A /srv/moved/sub/f',
        'A /tmp/new',
        'A /var/logs',
        'C /bin',
        'C /etc',
        'C /etc/passwd',
        'C /root',
        'C /tmp',
        'C /var',
        'D /bin/vi',
        'D /etc/group',
        'D /var/log',
      ].sort(),
    );
    await d.dockerOk(['commit', 'ops', 'gear-test/ops:committed']);
    const fromCommit = await d.dockerOk([
      'run', '--rm', 'gear-test/ops:committed', 'sh', '-c',
      'cat /tmp/new; tail -1 /etc/passwd; stat -c %a /etc/passwd; test ! -e /etc/group && echo nogroup; cat /srv/moved/sub/f; test -d /var/logs && test ! -e /var/log && echo renamed; readlink /root/link; test ! -e /bin/vi && echo novi',
    ]);
    expect(fromCommit.stdout).toBe('new\nextra\n600\nnogroup\nin\nrenamed\n/tmp/new\nnovi\n');
    // The committed image has exactly one more layer than its base.
    expect((await diffIds(d, 'gear-test/ops:committed')).length).toBe((await diffIds(d, BUSYBOX_TAG)).length + 1);
    await d.dockerOk(['rm', '-f', 'ops']);
  });

  it('builds a multi-stage image with COPY and RUN (whiteouts, opaque dirs, hard links across layers)', async () => {
    await buildImage(d, 'gear-test/layered:1', LAYERED_DOCKERFILE(BUSYBOX_TAG), LAYERED_FILES);
    const out = await d.dockerOk(['run', '--rm', 'gear-test/layered:1', 'sh', '-c', LAYERED_CHECK]);
    expect(out.stdout).toBe(expectedLayeredOutput());
    const multi = `FROM ${BUSYBOX_TAG} AS builder
RUN mkdir /out && echo built > /out/artifact && seq 1 1000 > /out/numbers
FROM gear-test/layered:1
COPY --from=builder /out/ /opt/
RUN cat /opt/artifact > /opt/copy && wc -l < /opt/numbers > /opt/count
`;
    await buildImage(d, 'gear-test/multistage:1', multi);
    const m = await d.dockerOk(['run', '--rm', 'gear-test/multistage:1', 'sh', '-c', 'cat /opt/copy /opt/count; cat /l/keep/a']);
    expect(m.stdout).toBe('built\n1000\none\nappended\n');
  });

  it('pushes to and pulls from a local registry, with layer digests matching the image', async () => {
    const ref = `${reg.host}/gear-test/layered:1`;
    await d.dockerOk(['tag', 'gear-test/layered:1', ref]);
    await d.dockerOk(['push', ref]);
    const ids = await diffIds(d, ref);
    const { manifest } = await registryManifest(reg, 'gear-test/layered', '1');
    expect(manifest.layers.length).toBe(ids.length);
    // Every pushed blob decompresses to exactly the layer Docker has (diffID).
    for (let i = 0; i < ids.length; i++) {
      const blob = await registryBlob(reg, 'gear-test/layered', manifest.layers[i]!.digest);
      expect(sha(gunzipSync(blob)), `layer ${i}`).toBe(ids[i]);
    }
    const imageId = (await d.dockerOk(['image', 'inspect', '-f', '{{.Id}}', ref])).stdout.trim();
    expect(manifest.config.digest).toBe(imageId);
    // Remove every image built on it first, so the pull below has to fetch all layers again.
    await d.docker(['rmi', 'gear-test/multistage:1']);
    await d.dockerOk(['rmi', ref, 'gear-test/layered:1']);

    const gone = await d.docker(['image', 'inspect', ref]);
    expect(gone.code).not.toBe(0);
    const pull = await d.dockerOk(['pull', ref]);
    // Only the busybox base layer may already be there; every other layer is downloaded and applied.
    expect(pull.stdout.match(/Pull complete/g)?.length ?? 0).toBe(ids.length - 1);
    expect((await d.dockerOk(['image', 'inspect', '-f', '{{.Id}}', ref])).stdout.trim()).toBe(imageId);
    const out = await d.dockerOk(['run', '--rm', ref, 'sh', '-c', LAYERED_CHECK]);
    expect(out.stdout).toBe(expectedLayeredOutput());
  });

  it('pushes a pulled image to another registry reproducing the same layer digests', async () => {
    const src = `${reg.host}/gear-test/layered:1`;
    const dst = `${reg2.host}/gear-test/copy:1`;
    const before = await registryManifest(reg, 'gear-test/layered', '1');
    await d.dockerOk(['tag', src, dst]);
    // A different registry: Docker has no upload record there, so it rebuilds every layer tar from the driver.
    const push = await d.dockerOk(['push', dst]);
    expect(push.stdout).not.toMatch(/Mounted from|Layer already exists/);
    const after = await registryManifest(reg2, 'gear-test/copy', '1');
    expect(after.manifest.layers.map((l) => l.digest)).toEqual(before.manifest.layers.map((l) => l.digest));
    expect(after.manifest.config.digest).toBe(before.manifest.config.digest);
    expect(after.digest).toBe(before.digest);
    const ids = await diffIds(d, dst);
    for (let i = 0; i < ids.length; i++) {
      const blob = await registryBlob(reg2, 'gear-test/copy', after.manifest.layers[i]!.digest);
      expect(sha(gunzipSync(blob)), `layer ${i}`).toBe(ids[i]);
    }
  });

  it('saves and loads an image; the archive layers match the diffIDs and the loaded image runs', async () => {
    const ref = `${reg.host}/gear-test/layered:1`;
    const file = join(work, 'saved.tar');
    const id = (await d.dockerOk(['image', 'inspect', '-f', '{{.Id}}', ref])).stdout.trim();
    const ids = await diffIds(d, ref);
    await d.dockerOk(['save', '-o', file, ref]);
    const entries = await readTar(file, true);
    const man = JSON.parse(entries.get('manifest.json')!.data!.toString()) as Array<{ Layers: string[]; Config: string }>;
    expect(man[0]!.Layers.map((l) => entries.get(l)?.sha)).toEqual(ids);
    await d.dockerOk(['rmi', '-f', ref, `${reg2.host}/gear-test/copy:1`]);
    expect((await d.docker(['image', 'inspect', ref])).code).not.toBe(0);
    await d.dockerOk(['load', '-i', file]);
    expect((await d.dockerOk(['image', 'inspect', '-f', '{{.Id}}', ref])).stdout.trim()).toBe(id);
    const out = await d.dockerOk(['run', '--rm', ref, 'sh', '-c', LAYERED_CHECK]);
    expect(out.stdout).toBe(expectedLayeredOutput());
  });

  it('docker cp copies into and out of containers, running and stopped', async () => {
    await d.dockerOk(['run', '-d', '--name', 'cp1', BUSYBOX_TAG, 'sleep', '3600']);
    const src = join(work, 'cpin');
    mkdirSync(join(src, 'sub'), { recursive: true });
    writeFileSync(join(src, 'a.txt'), 'alpha\n');
    writeFileSync(join(src, 'sub', 'b.bin'), Buffer.alloc(70_000, 7));
    await d.dockerOk(['cp', src, 'cp1:/root/']);
    const seen = await d.dockerOk(['exec', 'cp1', 'sh', '-c', 'cat /root/cpin/a.txt; wc -c < /root/cpin/sub/b.bin']);
    expect(seen.stdout.replace(/ +/g, '')).toBe('alpha\n70000\n');
    await d.dockerOk(['exec', 'cp1', 'sh', '-c', 'mkdir /made && echo made-inside > /made/x && ln -s x /made/y']);
    await d.dockerOk(['stop', '-t', '1', 'cp1']);
    const out = join(work, 'cpout');
    mkdirSync(out);
    await d.dockerOk(['cp', 'cp1:/made', out]);
    expect(readFileSync(join(out, 'made', 'x'), 'utf8')).toBe('made-inside\n');
    await d.dockerOk(['cp', join(src, 'a.txt'), 'cp1:/etc/a-stopped.txt']);
    await d.dockerOk(['cp', 'cp1:/etc/a-stopped.txt', join(out, 'back.txt')]);
    expect(readFileSync(join(out, 'back.txt'), 'utf8')).toBe('alpha\n');
    await d.dockerOk(['cp', 'cp1:/root/cpin/sub/b.bin', join(out, 'b.bin')]);
    expect(readFileSync(join(out, 'b.bin')).equals(Buffer.alloc(70_000, 7))).toBe(true);
    await d.dockerOk(['rm', 'cp1']);
  });

  it('docker export gives the whole container filesystem with the container changes', async () => {
    await d.dockerOk(['create', '--name', 'exp', BUSYBOX_TAG, 'true']);
    await d.dockerOk(['start', '-a', 'exp']);
    await d.dockerOk(['run', '--name', 'exp2', BUSYBOX_TAG, 'sh', '-c', 'echo exported > /root/e && rm /etc/group && chmod 4711 /root/e']);
    const file = join(work, 'export.tar');
    await d.dockerOk(['export', '-o', file, 'exp2']);
    const entries = await readTar(file, true);
    expect(entries.get('root/e')?.data?.toString()).toBe('exported\n');
    expect(entries.get('root/e')?.mode).toBe(0o4711);
    expect(entries.has('etc/group')).toBe(false);
    expect(entries.get('etc/passwd')?.type).toBe('file');
    expect(entries.get('bin/busybox')?.sha).toBe(sha(readFileSync('/bin/busybox')));
    expect(entries.get('bin/ls')?.linkname).toBe('/bin/busybox');
    expect(entries.get('tmp')?.mode).toBe(0o1777);
    await d.dockerOk(['rm', 'exp', 'exp2']);
  });

  it('keeps a stopped container across dockerd restarts (also of the driver daemon) with its files intact', async () => {
    const cmd = 'echo run >> /keep/marker && cat /keep/marker && mkdir -p /keep/d && date > /keep/d/$(cat /keep/marker | wc -l)';
    const first = await d.dockerOk(['run', '--name', 'keeper', BUSYBOX_TAG, 'sh', '-c', `mkdir -p /keep && ${cmd}`]);
    expect(first.stdout).toBe('run\n');
    await d.restart();
    const info = await d.dockerOk(['ps', '-a', '--filter', 'name=keeper', '--format', '{{.Names}} {{.Status}}']);
    expect(info.stdout).toMatch(/^keeper Exited \(0\)/);
    const second = await d.dockerOk(['start', '-a', 'keeper']);
    expect(second.stdout).toBe('run\nrun\n');
    await d.restart({ restartGear: true });
    const third = await d.dockerOk(['start', '-a', 'keeper']);
    expect(third.stdout).toBe('run\nrun\nrun\n');
    const diff = await dockerDiff(d, 'keeper');
    expect(diff).toEqual(['A /keep', 'A /keep/d', 'A /keep/d/1', 'A /keep/d/2', 'A /keep/d/3', 'A /keep/marker']);
    // Images survived the restarts too.
    const out = await d.dockerOk(['run', '--rm', `${reg.host}/gear-test/layered:1`, 'sh', '-c', LAYERED_CHECK]);
    expect(out.stdout).toBe(expectedLayeredOutput());
    await d.dockerOk(['rm', 'keeper']);
  });

  // Docker refuses images deeper than 125 layers (layer store maxLayerDepth = 125, "max depth
  // exceeded"), so 125 is the deepest image a user can have; its containers stack 127 dirs.
  it('runs an image with 125 layers, the most Docker allows (whiteouts and opaque dirs in many layers)', async () => {
    await loadLayeredImage(d, 'gear-test/deep:125', 125);
    expect((await diffIds(d, 'gear-test/deep:125')).length).toBe(125);
    const out = await d.dockerOk(['run', '--rm', 'gear-test/deep:125', 'sh', '-c', LAYERED_ARCHIVE_CHECK]);
    expect(out.stdout).toBe(expectedLayeredArchiveOutput(125));
    await d.dockerOk(['run', '--name', 'deep', 'gear-test/deep:125', 'sh', '-c', 'echo 126 > /layers/top && rm /layers/f-2 && rm -r /layers/opq']);
    expect(await dockerDiff(d, 'deep')).toEqual(['C /layers', 'C /layers/top', 'D /layers/f-2', 'D /layers/opq']);
    // Started again, the container sees its own earlier deletion.
    const again = await d.docker(['start', '-a', 'deep']);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/can't remove.*f-2/);
    const file = join(work, 'deep.tar');
    await d.dockerOk(['export', '-o', file, 'deep']);
    const entries = await readTar(file, true);
    expect(entries.get('layers/top')?.data?.toString()).toBe('126\n');
    expect(entries.has('layers/f-2')).toBe(false);
    expect(entries.get('layers/f-125')?.data?.toString()).toBe('layer 125\n'.repeat(125));
    expect([...entries.keys()].filter((k) => k.startsWith('layers/opq'))).toEqual([]);
    await d.dockerOk(['rm', 'deep']);
  });

  it('imports and runs a debootstrap minbase image, and builds on it', async () => {
    await importMinbase(d);
    const r = await d.dockerOk(['run', '--rm', MINBASE_TAG, 'bash', '-c', 'dpkg-query -W | wc -l; apt-get --version | head -1 | cut -d" " -f1; find / -xdev -type f | wc -l']);
    const [pkgs, apt, files] = r.stdout.trim().split('\n');
    expect(Number(pkgs)).toBeGreaterThan(50);
    expect(apt).toBe('apt');
    expect(Number(files)).toBeGreaterThan(3000);
    await buildImage(d, 'gear-test/layered-minbase:1', LAYERED_DOCKERFILE(MINBASE_TAG), LAYERED_FILES);
    const out = await d.dockerOk(['run', '--rm', 'gear-test/layered-minbase:1', 'bash', '-c', LAYERED_CHECK]);
    expect(out.stdout).toBe(expectedLayeredOutput());
  });

  it('rm, rmi and system prune remove containers, images and their layers from disk', async () => {
    await d.dockerOk(['run', '--name', 'leftover', BUSYBOX_TAG, 'true']);
    await d.dockerOk(['rm', 'leftover']);
    expect((await d.docker(['container', 'inspect', 'leftover'])).code).not.toBe(0);
    await d.dockerOk(['rmi', 'gear-test/deep:125']);
    expect((await d.docker(['image', 'inspect', 'gear-test/deep:125'])).code).not.toBe(0);
    await d.dockerOk(['create', '--name', 'stopped', BUSYBOX_TAG, 'true']);
    await d.dockerOk(['system', 'prune', '-a', '-f']);
    expect((await d.dockerOk(['ps', '-aq'])).stdout.trim()).toBe('');
    expect((await d.dockerOk(['images', '-aq'])).stdout.trim()).toBe('');
    expect(driverLayerDirs(d)).toEqual([]);
    expect(overlayMountsUnder(d.dir)).toEqual([]);
  });
});
