/**
 * Test images built without any public registry.
 *
 * - busybox: a rootfs with /bin/busybox (static) and its applet links, imported
 *   with `docker import`.
 * - minbase: `debootstrap --variant=minbase bookworm`, built once into a cache
 *   outside the repo (GEAR_TEST_CACHE, default /var/cache/gear-test) and reused.
 * - buildImage(): `docker build` (classic builder) from a Dockerfile and files
 *   written by the test.
 * - writeLayeredArchive(): a docker-archive (docker save format) with N layers
 *   generated directly, for `docker load` (125 layers, Docker's maximum, in seconds).
 */
import { createHash } from 'node:crypto';
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync, chmodSync, copyFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import tar, { type Header as TarHeader } from 'tar-stream';
import type { Dockerd } from './dockerd.js';
import { run, runOk } from './proc.js';

export const BUSYBOX_BIN = '/bin/busybox';
export const CACHE_DIR = process.env.GEAR_TEST_CACHE ?? '/var/cache/gear-test';
export const MINBASE_TAR = join(CACHE_DIR, 'minbase-bookworm.tar');
export const DEBIAN_MIRROR = process.env.GEAR_TEST_MIRROR ?? 'http://deb.debian.org/debian';

export const BUSYBOX_TAG = 'gear-test/busybox:latest';
export const MINBASE_TAG = 'gear-test/minbase:bookworm';

// ---------------------------------------------------------------- busybox

/** Writes a small busybox root filesystem into dir (which must exist and be empty). */
export async function writeBusyboxRootfs(dir: string): Promise<void> {
  for (const d of ['bin', 'sbin', 'usr/bin', 'usr/sbin', 'etc', 'root', 'home', 'var/log', 'var/tmp', 'dev', 'proc', 'sys']) {
    mkdirSync(join(dir, d), { recursive: true });
  }
  mkdirSync(join(dir, 'tmp'));
  chmodSync(join(dir, 'tmp'), 0o1777);
  chmodSync(join(dir, 'var/tmp'), 0o1777);
  chmodSync(join(dir, 'root'), 0o700);
  copyFileSync(BUSYBOX_BIN, join(dir, 'bin/busybox'));
  chmodSync(join(dir, 'bin/busybox'), 0o755);
  const list = await runOk(BUSYBOX_BIN, ['--list-full']);
  for (const rel of list.stdout.split('\n').map((s) => s.trim()).filter(Boolean)) {
    if (rel === 'bin/busybox') continue;
    const target = join(dir, rel);
    if (existsSync(target)) continue;
    mkdirSync(dirname(target), { recursive: true });
    symlinkSync('/bin/busybox', target);
  }
  writeFileSync(
    join(dir, 'etc/passwd'),
    'root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n',
  );
  writeFileSync(join(dir, 'etc/group'), 'root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n');
  writeFileSync(join(dir, 'etc/hostname'), 'busybox\n');
}

/** A tar (uncompressed, numeric owners) of the busybox rootfs. */
export async function busyboxTar(outFile: string): Promise<void> {
  const dir = mkdtempSync('/tmp/gbb-');
  try {
    await writeBusyboxRootfs(dir);
    await runOk('tar', ['--numeric-owner', '--owner=0', '--group=0', '--sort=name', '-C', dir, '-cf', outFile, '.']);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Imports the busybox image into d as tag (default gear-test/busybox:latest); returns its image id. */
export async function importBusybox(d: Dockerd, tag = BUSYBOX_TAG): Promise<string> {
  const dir = mkdtempSync('/tmp/gbt-');
  try {
    const file = join(dir, 'busybox.tar');
    await busyboxTar(file);
    const r = await d.dockerOk(['import', '--change', 'CMD ["/bin/sh"]', '--change', 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin', file, tag]);
    return r.stdout.trim();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- minbase (debootstrap)

/**
 * Returns the path of the cached minbase rootfs tar, building it first if needed
 * (debootstrap, a few minutes; progress goes to stderr). Built to a temp name and
 * renamed, so a crash never leaves a partial cache.
 */
export async function ensureMinbaseTar(log: (m: string) => void = (m) => process.stderr.write(m + '\n')): Promise<string> {
  if (existsSync(MINBASE_TAR) && statSync(MINBASE_TAR).size > 10_000_000) return MINBASE_TAR;
  mkdirSync(CACHE_DIR, { recursive: true });
  const work = mkdtempSync(join(CACHE_DIR, '.build-'));
  const rootfs = join(work, 'rootfs');
  const started = Date.now();
  try {
    log(`[images] building ${MINBASE_TAR} with debootstrap --variant=minbase bookworm (first time only, a few minutes)`);
    let lastLog = 0;
    const r = await run('debootstrap', ['--variant=minbase', 'bookworm', rootfs, DEBIAN_MIRROR], {
      timeoutMs: 30 * 60_000,
      onStdout: (c) => {
        // At most one progress line every 10 s.
        const line = c.trim().split('\n').filter((l) => l.startsWith('I: ')).pop();
        if (line && Date.now() - lastLog > 10_000) {
          lastLog = Date.now();
          log(`[images] debootstrap (${Math.round((Date.now() - started) / 1000)} s): ${line}`);
        }
      },
    });
    if (r.code !== 0) {
      throw new Error(`debootstrap failed (code ${r.code}):\n${r.stdout.slice(-3000)}\n${r.stderr.slice(-3000)}`);
    }
    // Trim what a container image does not carry: downloaded .debs, apt lists, device nodes.
    await runOk('sh', ['-c', 'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/dev/* "$1"/debootstrap', 'sh', rootfs]);
    const tmpTar = join(work, 'minbase.tar');
    await runOk('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--sort=name', '-C', rootfs, '-cf', tmpTar, '.'], {
      timeoutMs: 10 * 60_000,
    });
    renameSync(tmpTar, MINBASE_TAR);
    log(`[images] minbase cache ready (${Math.round(statSync(MINBASE_TAR).size / 1e6)} MB, ${Math.round((Date.now() - started) / 1000)} s)`);
    return MINBASE_TAR;
  } finally {
    // debootstrap unmounts proc/sys itself; be safe before removing.
    await run('sh', ['-c', 'for m in $(grep -o " $1/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m"; done', 'sh', work]);
    rmSync(work, { recursive: true, force: true });
  }
}

/** Imports the cached minbase rootfs as tag (default gear-test/minbase:bookworm); returns its image id. */
export async function importMinbase(d: Dockerd, tag = MINBASE_TAG): Promise<string> {
  const file = await ensureMinbaseTar();
  const r = await d.dockerOk(['import', '--change', 'CMD ["/bin/bash"]', file, tag], { timeoutMs: 600_000 });
  return r.stdout.trim();
}

// ---------------------------------------------------------------- docker build

/**
 * Builds an image with the classic builder from a Dockerfile and context files
 * written by the test. files maps relative paths to contents.
 */
export async function buildImage(
  d: Dockerd,
  tag: string,
  dockerfile: string,
  files: Record<string, string | Buffer> = {},
  extraArgs: string[] = [],
): Promise<string> {
  const ctx = mkdtempSync('/tmp/gctx-');
  try {
    writeFileSync(join(ctx, 'Dockerfile'), dockerfile);
    for (const [rel, content] of Object.entries(files)) {
      mkdirSync(dirname(join(ctx, rel)), { recursive: true });
      writeFileSync(join(ctx, rel), content);
    }
    await d.dockerOk(['build', '--network=none', '-q', '-t', tag, ...extraArgs, ctx], { timeoutMs: 900_000 });
    const id = await d.dockerOk(['image', 'inspect', '-f', '{{.Id}}', tag]);
    return id.stdout.trim();
  } finally {
    rmSync(ctx, { recursive: true, force: true });
  }
}

/**
 * A multi-layer image over base exercising the hard cases: files deleted in a
 * later layer (whiteouts), a directory removed and re-created (opaque dir),
 * hard links to files of an earlier layer, a renamed directory, chmod/chown of
 * lower files, and COPY. expectLayered() checks a container of it.
 */
export const LAYERED_DOCKERFILE = (base: string) => `FROM ${base}
COPY data/ /data/
RUN mkdir -p /l/keep /l/gone /l/opaque/sub && echo one > /l/keep/a && echo two > /l/gone/b \\
 && echo three > /l/opaque/sub/c && echo four > /l/opaque/d && echo five > /l/file && echo six > /l/mode \\
 && mkdir /l/olddir && echo seven > /l/olddir/e
RUN rm -rf /l/gone && rm /l/file && rm -rf /l/opaque && mkdir /l/opaque && echo new > /l/opaque/n \\
 && ln /l/keep/a /l/keep/a-link && ln /data/hello.txt /l/hello-link && mv /l/olddir /l/newdir \\
 && chmod 0600 /l/mode && chown 1:1 /l/mode && ln -s ../keep/a /l/opaque/sym
RUN echo appended >> /l/keep/a && touch -d '2001-02-03 04:05:06' /l/keep
`;

export const LAYERED_FILES: Record<string, string> = {
  'data/hello.txt': 'hello from the build context\n',
  'data/sub/deep.txt': 'deep\n',
};

/** The listing a container of the layered image must print for LAYERED_CHECK. */
export const LAYERED_CHECK = [
  'set -e',
  'cd /l',
  // find: sorted paths under /l, with type
  'find . | sort',
  'echo ---',
  'cat keep/a keep/a-link opaque/n hello-link newdir/e',
  'echo ---',
  'stat -c "%n %a %u %g %h" mode keep/a keep/a-link hello-link',
  'readlink opaque/sym',
  'test ! -e gone && test ! -e file && test ! -e opaque/sub && test ! -e olddir && echo deletions-ok',
  // Hard links of one layer stay one inode; a later layer's copy-up of one name breaks the
  // link (overlay2 behaviour: keep/a is rewritten in layer 3, keep/a-link keeps the old data).
  '[ "$(stat -c %i /data/hello.txt)" = "$(stat -c %i hello-link)" ] && echo hardlink-ok',
  '[ "$(stat -c %i keep/a)" != "$(stat -c %i keep/a-link)" ] && echo hardlink-broken-by-copy-up',
  'stat -c %y keep | cut -c1-19',
].join('\n');

export function expectedLayeredOutput(): string {
  return [
    '.',
    './hello-link',
    './keep',
    './keep/a',
    './keep/a-link',
    './mode',
    './newdir',
    './newdir/e',
    './opaque',
    './opaque/n',
    './opaque/sym',
    '---',
    'one',
    'appended',
    'one',
    'new',
    'hello from the build context',
    'seven',
    '---',
    'mode 600 1 1 1',
    'keep/a 644 0 0 1',
    'keep/a-link 644 0 0 2',
    'hello-link 644 0 0 2',
    '../keep/a',
    'deletions-ok',
    'hardlink-ok',
    'hardlink-broken-by-copy-up',
    '2001-02-03 04:05:06',
    '',
  ].join('\n');
}

// ---------------------------------------------------------------- docker-archive with many layers

export interface TarEntry {
  name: string;
  type?: 'file' | 'directory' | 'symlink' | 'link' | 'fifo' | 'character-device' | 'block-device';
  mode?: number;
  uid?: number;
  gid?: number;
  content?: Buffer | string;
  linkname?: string;
  devmajor?: number;
  devminor?: number;
  /** PAX records, e.g. {'SCHILY.xattr.user.k': 'v'}. */
  pax?: Record<string, string>;
  mtime?: Date;
}

/** An uncompressed tar of the entries, in order (for layer tars with exact headers). */
export async function tarBuffer(entries: TarEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    pack.on('data', (c: unknown) => chunks.push(c as Buffer));
    pack.on('end', () => resolve());
    pack.on('error', reject);
  });
  const mtime = new Date('2020-01-01T00:00:00Z');
  for (const e of entries) {
    const type = e.type ?? 'file';
    const header: Partial<TarHeader> & { name: string } = {
      name: e.name,
      type,
      mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: e.mtime ?? mtime,
    };
    if (e.linkname !== undefined) header.linkname = e.linkname;
    if (e.devmajor !== undefined) header.devmajor = e.devmajor;
    if (e.devminor !== undefined) header.devminor = e.devminor;
    if (e.pax) header.pax = e.pax;
    if (type === 'file') pack.entry(header, typeof e.content === 'string' ? Buffer.from(e.content) : e.content ?? Buffer.alloc(0));
    else pack.entry(header);
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/**
 * The expected state after all n layers of writeLayeredArchive():
 * /layers/top holds n, /layers/f-<i> exists for every i, /layers/del-<i> only for i = n,
 * /layers/opq holds only the files of the last multiple-of-10 layer onwards.
 */
export const LAYERED_ARCHIVE_CHECK =
  'cat /layers/top; ls /layers | grep -c "^f-"; ls /layers | grep "^del-"; ls /layers/opq | sort | tr "\\n" " "; echo';

export function expectedLayeredArchiveOutput(n: number): string {
  const lastOpq = Math.floor(n / 10) * 10;
  const opq: string[] = [];
  for (let i = Math.max(2, lastOpq); i <= n; i++) opq.push(`o-${i}`);
  return `${n}\n${n - 1}\ndel-${n}\n${opq.sort().join(' ')} \n`;
}

/**
 * Writes a docker-archive (the `docker save` format: manifest.json, config, one
 * dir per layer) holding an image of n layers: layer 1 is the busybox rootfs,
 * each layer i >= 2 adds /layers/f-<i>, rewrites /layers/top, whites out
 * /layers/del-<i-1> and adds /layers/del-<i>, adds /layers/opq/o-<i>, and every
 * 10th layer makes /layers/opq opaque. Returns the config digest (the image id).
 */
export async function writeLayeredArchive(outFile: string, tag: string, n = 125): Promise<string> {
  if (n < 2) throw new Error('need at least 2 layers');
  const layers: Buffer[] = [await busyboxLayer()];
  for (let i = 2; i <= n; i++) {
    const entries: TarEntry[] = [{ name: 'layers/', type: 'directory' }];
    if (i > 2) entries.push({ name: `layers/.wh.del-${i - 1}`, content: '' });
    entries.push({ name: `layers/del-${i}`, content: `del ${i}\n` });
    entries.push({ name: `layers/f-${i}`, content: `layer ${i}\n`.repeat(i) });
    entries.push({ name: 'layers/top', content: `${i}\n` });
    entries.push({ name: 'layers/opq/', type: 'directory' });
    if (i % 10 === 0) entries.push({ name: 'layers/opq/.wh..wh..opq', content: '' });
    entries.push({ name: `layers/opq/o-${i}`, content: `o ${i}\n` });
    layers.push(await tarBuffer(entries));
  }
  return writeDockerArchive(outFile, tag, layers);
}

/** The busybox rootfs as a layer tar (Buffer). */
export async function busyboxLayer(): Promise<Buffer> {
  const tmp = mkdtempSync('/tmp/gla-');
  try {
    const bbTar = join(tmp, 'bb.tar');
    await busyboxTar(bbTar);
    return readFileSync(bbTar);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * Writes a docker-archive (`docker save` format, loadable by `docker load`) of an
 * image made of the given uncompressed layer tars. Deterministic: the same layers
 * give the same image id on every daemon. Returns the image id (config digest).
 */
export async function writeDockerArchive(
  outFile: string,
  tag: string,
  layers: Buffer[],
  cmd: string[] = ['/bin/sh'],
): Promise<string> {
  const diffIds = layers.map((l) => `sha256:${sha256(l)}`);
  const created = '2020-01-01T00:00:00Z';
  const config = {
    architecture: 'amd64',
    os: 'linux',
    created,
    config: { Env: ['PATH=/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: cmd },
    rootfs: { type: 'layers', diff_ids: diffIds },
    history: layers.map((_, i) => ({ created, created_by: `gear-test layer ${i + 1}` })),
  };
  const configBuf = Buffer.from(JSON.stringify(config));
  const configHex = sha256(configBuf);
  const layerPaths = layers.map((_, i) => `${sha256(`${configHex}/${i}`)}/layer.tar`);
  const manifest = [{ Config: `${configHex}.json`, RepoTags: [tag], Layers: layerPaths }];

  const pack = tar.pack();
  const out = createWriteStream(outFile);
  const piped = pipeline(pack, out);
  const mtime = new Date('2020-01-01T00:00:00Z');
  const add = (name: string, content?: Buffer) =>
    content === undefined
      ? pack.entry({ name, type: 'directory', mode: 0o755, mtime })
      : pack.entry({ name, type: 'file', mode: 0o644, mtime }, content);
  add(`${configHex}.json`, configBuf);
  for (let i = 0; i < layers.length; i++) {
    add(dirname(layerPaths[i]!) + '/');
    add(`${dirname(layerPaths[i]!)}/VERSION`, Buffer.from('1.0'));
    add(layerPaths[i]!, layers[i]!);
  }
  add('manifest.json', Buffer.from(JSON.stringify(manifest)));
  pack.finalize();
  await piped;
  return `sha256:${configHex}`;
}

/** Writes and loads a docker-archive of the given layers as tag; returns the image id. */
export async function loadLayers(d: Dockerd, tag: string, layers: Buffer[], cmd?: string[]): Promise<string> {
  const tmp = mkdtempSync('/tmp/gla-');
  try {
    const file = join(tmp, 'image.tar');
    const id = await writeDockerArchive(file, tag, layers, cmd);
    await d.dockerOk(['load', '-i', file], { timeoutMs: 900_000 });
    return id;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** Generates and loads an n-layer image as tag; returns the image id. */
export async function loadLayeredImage(d: Dockerd, tag: string, n = 125): Promise<string> {
  const tmp = mkdtempSync('/tmp/gla-');
  try {
    const file = join(tmp, 'image.tar');
    const id = await writeLayeredArchive(file, tag, n);
    await d.dockerOk(['load', '-i', file], { timeoutMs: 900_000 });
    return id;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}
