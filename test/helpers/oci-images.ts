/**
 * Test image builders for `gear convert`: OCI image layouts and docker-archive
 * tars written from a list of layers, with tar-stream, without any registry.
 *
 * A layer is a list of `LayerEntry`; `expectedTree` applies layers the way a
 * container runtime would (whiteouts, opaque dirs, hard links), giving the
 * regular files a converted image must serve.
 */
import { createHash } from 'node:crypto';
import { createReadStream, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { pack as tarPack } from 'tar-stream';

type TarHeaders = Parameters<ReturnType<typeof tarPack>['entry']>[0];
import { runOk } from './proc.js';

export interface LayerEntry {
  path: string;
  type?: 'file' | 'dir' | 'symlink' | 'link' | 'fifo' | 'char';
  content?: Buffer | string;
  mode?: number;
  linkname?: string;
  uid?: number;
  gid?: number;
  mtime?: number;
  /** PAX records (e.g. SCHILY.xattr.user.x). tar-stream writes string values only. */
  pax?: Record<string, string>;
}

export const sha256 = (b: Buffer | string) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** An uncompressed layer tar built with tar-stream. */
export async function layerTar(entries: LayerEntry[]): Promise<Buffer> {
  const p = tarPack();
  const parts: Buffer[] = [];
  p.on('data', (c: unknown) => parts.push(c as Buffer));
  const done = new Promise<void>((resolve, reject) => {
    p.on('end', resolve);
    p.on('error', reject);
  });
  for (const e of entries) {
    const type = e.type ?? 'file';
    const content = e.content === undefined ? undefined : Buffer.from(e.content);
    const h: TarHeaders = {
      name: e.path,
      type: type === 'dir' ? 'directory' : type === 'char' ? 'character-device' : type,
      mode: e.mode ?? (type === 'dir' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: new Date((e.mtime ?? 1_700_000_000) * 1000),
      ...(e.linkname !== undefined ? { linkname: e.linkname } : {}),
      ...(e.pax ? { pax: e.pax } : {}),
      size: type === 'file' ? (content?.length ?? 0) : 0,
    };
    await new Promise<void>((resolve, reject) => {
      if (type === 'file') p.entry(h, content ?? Buffer.alloc(0), (err) => (err ? reject(err) : resolve()));
      else p.entry(h, (err) => (err ? reject(err) : resolve()));
    });
  }
  p.finalize();
  await done;
  return Buffer.concat(parts);
}

export interface BuiltLayer {
  tar: Buffer;
  diffId: string;
}

export async function buildLayers(layers: (LayerEntry[] | Buffer)[]): Promise<BuiltLayer[]> {
  const out: BuiltLayer[] = [];
  for (const l of layers) {
    const tar = Buffer.isBuffer(l) ? l : await layerTar(l);
    out.push({ tar, diffId: sha256(tar) });
  }
  return out;
}

export function imageConfig(diffIds: string[], extra: Record<string, unknown> = {}): Buffer {
  return Buffer.from(
    JSON.stringify({
      created: '2024-01-01T00:00:00Z',
      architecture: 'amd64',
      os: 'linux',
      config: { Env: ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'], Cmd: ['/bin/sh'], WorkingDir: '/', Labels: { test: 'yes' } },
      rootfs: { type: 'layers', diff_ids: diffIds },
      history: diffIds.map((_, i) => ({ created: '2024-01-01T00:00:00Z', created_by: `layer ${i}` })),
      ...extra,
    }),
  );
}

export interface OciImageOptions {
  tag?: string;
  /** Replace the stored bytes of layer i (after digests are computed) to simulate corruption. */
  corruptLayer?: (i: number, blob: Buffer) => Buffer;
  gzip?: boolean;
}

/** Writes an OCI image layout with one image; layers gzip-compressed by default. Returns the manifest digest. */
export async function writeOciImage(dir: string, layers: (LayerEntry[] | Buffer)[], opts: OciImageOptions = {}): Promise<string> {
  const built = await buildLayers(layers);
  const blobs = join(dir, 'blobs', 'sha256');
  mkdirSync(blobs, { recursive: true });
  const put = (b: Buffer) => {
    const d = sha256(b);
    writeFileSync(join(blobs, d.slice(7)), b);
    return { digest: d, size: b.length };
  };
  const layerDescs = built.map((l, i) => {
    const blob = opts.gzip === false ? l.tar : gzipSync(l.tar);
    const d = put(blob);
    if (opts.corruptLayer) writeFileSync(join(blobs, d.digest.slice(7)), opts.corruptLayer(i, blob));
    return { mediaType: opts.gzip === false ? 'application/vnd.oci.image.layer.v1.tar' : 'application/vnd.oci.image.layer.v1.tar+gzip', ...d };
  });
  const cfg = put(imageConfig(built.map((l) => l.diffId)));
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg },
      layers: layerDescs,
    }),
  );
  const m = put(manifest);
  writeFileSync(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  writeFileSync(
    join(dir, 'index.json'),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...m, annotations: { 'org.opencontainers.image.ref.name': opts.tag ?? 'latest' } }],
    }),
  );
  return m.digest;
}

/**
 * Writes a legacy `docker save` archive (manifest.json, <hex>.json, <n>/layer.tar).
 * configExtra replaces top-level keys of the image config (e.g. `config` for an Entrypoint).
 */
export async function writeDockerArchive(
  file: string,
  layers: (LayerEntry[] | Buffer)[],
  tag = 'gear-test/image:latest',
  configExtra: Record<string, unknown> = {},
): Promise<string> {
  const built = await buildLayers(layers);
  const cfg = imageConfig(built.map((l) => l.diffId), configExtra);
  const cfgName = `${sha256(cfg).slice(7)}.json`;
  const entries: LayerEntry[] = [];
  const layerNames: string[] = [];
  built.forEach((l, i) => {
    const id = sha256(`layer-${i}-${l.diffId}`).slice(7);
    entries.push({ path: `${id}/`, type: 'dir' }, { path: `${id}/layer.tar`, content: l.tar }, { path: `${id}/VERSION`, content: '1.0' });
    layerNames.push(`${id}/layer.tar`);
  });
  entries.push({ path: cfgName, content: cfg });
  entries.push({ path: 'manifest.json', content: JSON.stringify([{ Config: cfgName, RepoTags: [tag], Layers: layerNames }]) });
  writeFileSync(file, await layerTar(entries));
  return sha256(cfg);
}

// ---------------------------------------------------------------- expected trees

export interface ExpectedFile {
  content: Buffer;
  mode: number;
}

/** Applies layers like a runtime would; returns regular files (path → content) of the final tree. */
export function expectedFiles(layers: LayerEntry[][]): Map<string, Buffer> {
  type Node = { kind: 'file'; content: { b: Buffer } } | { kind: 'other' } | { kind: 'dir' };
  const tree = new Map<string, Node>();
  const norm = (p: string) => p.split('/').filter((c) => c && c !== '.').join('/');
  const removeTree = (p: string) => {
    for (const k of [...tree.keys()]) if (k === p || k.startsWith(`${p}/`)) tree.delete(k);
  };
  for (const layer of layers) {
    const own: LayerEntry[] = [];
    for (const e of layer) {
      const p = norm(e.path);
      const base = p.split('/').pop()!;
      const parent = p.split('/').slice(0, -1).join('/');
      if (base === '.wh..wh..opq') {
        for (const k of [...tree.keys()]) if (k.startsWith(parent ? `${parent}/` : '')) tree.delete(k);
      } else if (base.startsWith('.wh.')) removeTree(parent ? `${parent}/${base.slice(4)}` : base.slice(4));
      else own.push(e);
    }
    for (const e of own) {
      const p = norm(e.path);
      const type = e.type ?? 'file';
      const existing = tree.get(p);
      if (type !== 'dir' || existing?.kind !== 'dir') removeTree(p);
      if (type === 'file') tree.set(p, { kind: 'file', content: { b: Buffer.from(e.content ?? '') } });
      else if (type === 'link') {
        const t = tree.get(norm(e.linkname!));
        if (!t) throw new Error(`test image: hard link target ${e.linkname} missing`);
        tree.set(p, t);
      } else if (type === 'dir') tree.set(p, { kind: 'dir' });
      else tree.set(p, { kind: 'other' });
    }
  }
  const out = new Map<string, Buffer>();
  for (const [k, v] of tree) if (v.kind === 'file') out.set(k, v.content.b);
  return out;
}

// ---------------------------------------------------------------- sample images

/** busybox-static: /bin/busybox plus its applet symlinks and a few /etc files. */
export async function busyboxLayer(): Promise<LayerEntry[]> {
  const list = (await runOk('/bin/busybox', ['--list-full'])).stdout.split('\n').map((s) => s.trim()).filter(Boolean);
  const dirs = new Set<string>(['bin', 'etc', 'tmp']);
  for (const rel of list) {
    const parts = rel.split('/');
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
  }
  const entries: LayerEntry[] = [...dirs].sort().map((d) => ({ path: `${d}/`, type: 'dir' as const, mode: d === 'tmp' ? 0o1777 : 0o755 }));
  entries.push({ path: 'bin/busybox', content: readFileSync('/bin/busybox'), mode: 0o755 });
  for (const rel of list) if (rel !== 'bin/busybox') entries.push({ path: rel, type: 'symlink', linkname: '/bin/busybox', mode: 0o777 });
  entries.push({ path: 'etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\n' });
  entries.push({ path: 'etc/group', content: 'root:x:0:\n' });
  entries.push({ path: 'etc/empty', content: '' });
  return entries;
}

/**
 * Three layers exercising flattening: files changed and deleted across
 * layers, an opaque directory, a hard link to a lower-layer file (which a
 * later layer then replaces), xattrs, a fifo and an empty file.
 */
export function multiLayerImage(): LayerEntry[][] {
  return [
    [
      { path: 'etc/', type: 'dir' },
      { path: 'etc/os-release', content: 'ID=gear-test\nVERSION=1\n' },
      { path: 'etc/shared.conf', content: 'shared between images\n' },
      { path: 'opt/', type: 'dir' },
      { path: 'opt/app/', type: 'dir' },
      { path: 'opt/app/old-1', content: 'old one' },
      { path: 'opt/app/old-2', content: 'old two' },
      { path: 'usr/', type: 'dir' },
      { path: 'usr/lib/', type: 'dir' },
      { path: 'usr/lib/libfoo.so.1', content: Buffer.alloc(200_000, 7), mode: 0o755 },
      { path: 'usr/lib/gone', content: 'will be whited out' },
      { path: 'usr/lib/gone-dir/', type: 'dir' },
      { path: 'usr/lib/gone-dir/inner', content: 'whole dir whited out' },
      { path: 'var/', type: 'dir' },
      { path: 'var/fifo', type: 'fifo' },
      { path: 'var/empty', content: '' },
    ],
    [
      { path: 'etc/', type: 'dir' },
      { path: 'etc/os-release', content: 'ID=gear-test\nVERSION=2\n' },
      { path: 'etc/cap-file', content: 'with xattr', pax: { 'SCHILY.xattr.user.gear-test': 'hello', 'SCHILY.xattr.trusted.overlay.redirect': '/evil' } },
      { path: 'opt/app/', type: 'dir' },
      { path: 'opt/app/.wh..wh..opq', content: '' },
      { path: 'opt/app/new', content: 'new file in opaque dir' },
      { path: 'usr/lib/.wh.gone', content: '' },
      { path: 'usr/lib/.wh.gone-dir', content: '' },
      { path: 'usr/lib/libfoo.so', type: 'link', linkname: 'usr/lib/libfoo.so.1' },
      { path: 'usr/bin/', type: 'dir' },
      { path: 'usr/bin/tool', content: 'tool v1', mode: 0o755 },
    ],
    [
      // Replace the link target: the hard link keeps the old content (inode semantics).
      { path: 'usr/lib/libfoo.so.1', content: Buffer.alloc(100_000, 9), mode: 0o755 },
      { path: 'usr/bin/tool-hardlink', type: 'link', linkname: 'usr/bin/tool' },
      { path: 'usr/bin/tool-copy', content: 'tool v1', mode: 0o755 },
    ],
  ];
}

/** Reads a whole file (tests only). */
export async function readAll(path: string): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of createReadStream(path)) parts.push(c as Buffer);
  return Buffer.concat(parts);
}
