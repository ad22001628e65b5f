/**
 * Conversion sources: where the image to convert comes from.
 *
 *   docker-archive:FILE      a `docker save` tar (legacy or OCI-style layout inside)
 *   docker-daemon:IMAGE      `GET /images/{name}/get` on the Docker Engine socket
 *   oci:DIR[:TAG]            an OCI image layout
 *   anything else            a registry reference (registry client)
 *
 * Every blob is verified while it is read: config against its digest, each
 * layer against its descriptor digest (when known) and its uncompressed
 * bytes against the config's diff_id.
 */
import { createReadStream, createWriteStream, existsSync, statSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { invalidArgument, notFound, unavailable } from '../core/errors.js';
import { readTar } from '../core/index/tar.js';
import { decompressed, verified } from './layer-stream.js';
import { platformMatches, type RegistryAccess } from './registry-adapter.js';
import { claimScratch } from './scratch.js';

const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const DOCKER_MANIFEST = 'application/vnd.docker.distribution.manifest.v2+json';

export interface SourceLayer {
  /** For messages: "layer 2/5 (sha256:…)". */
  name: string;
  /** Digest of the stored (possibly compressed) blob, when the source names one. */
  digest?: string;
  size?: number;
  /** Digest of the uncompressed tar (config rootfs.diff_ids). */
  diffId: string;
  /** The stored blob's bytes, unverified (layerTar verifies). */
  open(): Promise<AsyncIterable<Uint8Array>>;
}

/** Raw access to the blobs of a source that has a blob store (registry, OCI layout), for `gear copy`. */
export interface BlobReader {
  /** The registry repository the blobs come from (registry sources): lets a copy mount them. */
  repository?: { registry: string; repository: string };
  /** A local file holding the blob as stored, not verified (OCI layouts); undefined when absent or remote. */
  localPath?(digest: string): string | undefined;
  /** Downloads a blob into `path`, verified against digest and size. */
  fetchTo(digest: string, size: number, path: string): Promise<void>;
  /** Bytes start … start+length−1 of a blob (not verified: a range cannot be; the caller checks what they hold). */
  readRange?(digest: string, size: number, start: number, length: number): Promise<Buffer>;
}

export interface SourceImage {
  description: string;
  /** The image manifest as stored (registry, OCI layout sources). */
  manifest?: { bytes: Buffer; mediaType: string; digest: string };
  /** Blob access (registry, OCI layout sources). */
  blobs?: BlobReader;
  /** Manifest digest when the source has one, else config digest. */
  sourceDigest: string;
  configDigest: string;
  /** Verified config bytes. */
  config: Buffer;
  layers: SourceLayer[];
  close(): Promise<void>;
}

/**
 * Verified, decompressed tar bytes of a layer. An uncompressed blob (a
 * `docker save` archive's layers, an OCI layout's plain tar) has its diff_id
 * as digest: its bytes are hashed once (~0.1 s of the main thread per
 * 175 MB), and they must then be the tar itself, not compressed.
 */
export function layerTar(l: SourceLayer): AsyncIterable<Buffer> {
  return (async function* () {
    const raw: AsyncIterable<Buffer> = (await l.open()) as AsyncIterable<Buffer>;
    if (l.digest !== undefined && l.digest === l.diffId) {
      yield* decompressed(
        verified(raw, l.digest, l.size, `${l.name}: blob`),
        `${l.name}: the image config names the blob's own digest as its diff_id, so the blob must be an uncompressed tar, but it is compressed`,
      );
      return;
    }
    yield* verified(decompressed(l.digest ? verified(raw, l.digest, l.size, `${l.name}: blob`) : raw), l.diffId, undefined, `${l.name}: uncompressed content (diff_id)`);
  })();
}

/** Parses and checks the parts of an image config the converter relies on. */
export function configDiffIds(config: Buffer, what: string): string[] {
  let doc: unknown;
  try {
    doc = JSON.parse(config.toString('utf8'));
  } catch (err) {
    throw invalidArgument(`${what}: image config is not JSON`, err);
  }
  const rootfs = (doc as { rootfs?: { diff_ids?: unknown } } | null)?.rootfs;
  const ids = rootfs?.diff_ids;
  if (!Array.isArray(ids) || !ids.every((d) => typeof d === 'string' && DIGEST_RE.test(d))) {
    throw invalidArgument(`${what}: image config has no valid rootfs.diff_ids`);
  }
  return ids as string[];
}

function checkDigestString(d: unknown, what: string): string {
  if (typeof d !== 'string' || !DIGEST_RE.test(d)) throw invalidArgument(`${what}: invalid digest ${JSON.stringify(String(d).slice(0, 80))}`);
  return d;
}

async function verifiedBytes(chunks: AsyncIterable<Uint8Array>, digest: string, size: number | undefined, what: string, max = 64 * 1024 * 1024): Promise<Buffer> {
  const parts: Buffer[] = [];
  let n = 0;
  for await (const c of verified(chunks, digest, size, what)) {
    n += c.length;
    if (n > max) throw invalidArgument(`${what}: larger than ${max} bytes`);
    parts.push(c);
  }
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------
// OCI image layout

function readJsonFile(buf: Buffer, what: string): Record<string, unknown> {
  try {
    const v = JSON.parse(buf.toString('utf8'));
    if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch (err) {
    throw invalidArgument(`${what}: invalid JSON`, err);
  }
}

interface Desc {
  mediaType?: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: { os?: string; architecture?: string; variant?: string };
}

function descriptor(d: unknown, what: string): Desc {
  const o = d as Record<string, unknown>;
  if (!o || typeof o !== 'object') throw invalidArgument(`${what}: not a descriptor`);
  checkDigestString(o.digest, what);
  if (typeof o.size !== 'number' || !Number.isSafeInteger(o.size) || o.size < 0) throw invalidArgument(`${what}: invalid size`);
  return o as unknown as Desc;
}

/** Splits "DIR[:TAG]" for oci: (a directory that exists as written wins). */
export function splitOciArg(arg: string): { dir: string; tag?: string } {
  if (existsSync(arg)) return { dir: arg };
  const i = arg.lastIndexOf(':');
  if (i > 0 && !arg.slice(i + 1).includes('/')) return { dir: arg.slice(0, i), tag: arg.slice(i + 1) };
  return { dir: arg };
}

export async function openOciLayout(arg: string): Promise<SourceImage> {
  const { dir, tag } = splitOciArg(arg);
  const blobPath = (d: string) => join(dir, 'blobs', 'sha256', checkDigestString(d, 'oci layout').slice(7));
  const readBlob = async (d: Desc, what: string) => {
    try {
      return await verifiedBytes(createReadStream(blobPath(d.digest)), d.digest, d.size, what);
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') throw notFound(`${what}: blob ${d.digest} missing from ${dir}`);
      throw err;
    }
  };
  let indexBuf: Buffer;
  try {
    indexBuf = await readFile(join(dir, 'index.json'));
  } catch (err) {
    throw notFound(`oci:${dir}: no index.json (not an OCI image layout)`, err);
  }
  const index = readJsonFile(indexBuf, `oci:${dir}/index.json`);
  const entries = (Array.isArray(index.manifests) ? index.manifests : []).map((d, i) => descriptor(d, `oci:${dir} index.json manifests[${i}]`));
  let chosen: Desc | undefined;
  if (tag !== undefined) chosen = entries.find((d) => d.annotations?.['org.opencontainers.image.ref.name'] === tag);
  else if (entries.length === 1) chosen = entries[0];
  if (!chosen) {
    throw notFound(tag !== undefined ? `oci:${dir}: no image tagged ${JSON.stringify(tag)}` : `oci:${dir}: ${entries.length} images in the layout; name one with oci:DIR:TAG`);
  }
  let manifestBuf = await readBlob(chosen, `oci:${dir} manifest`);
  let manifestDigest = chosen.digest;
  let manifest = readJsonFile(manifestBuf, `oci:${dir} manifest`);
  for (let depth = 0; Array.isArray(manifest.manifests); depth++) {
    if (depth > 2) throw invalidArgument(`oci:${dir}: nested indexes too deep`);
    const list = (manifest.manifests as unknown[]).map((d, i) => descriptor(d, `oci:${dir} index manifests[${i}]`));
    const pick = list.find((d) => platformMatches(d.platform)) ;
    if (!pick) throw notFound(`oci:${dir}: no manifest for this platform in the index`);
    manifestBuf = await readBlob(pick, `oci:${dir} manifest`);
    manifestDigest = pick.digest;
    manifest = readJsonFile(manifestBuf, `oci:${dir} manifest`);
  }
  const mt = (manifest.mediaType as string | undefined) ?? chosen.mediaType ?? OCI_MANIFEST;
  if (mt !== OCI_MANIFEST && mt !== DOCKER_MANIFEST) throw invalidArgument(`oci:${dir}: unsupported manifest media type ${mt}`);
  const cfgDesc = descriptor(manifest.config, `oci:${dir} config`);
  const config = await readBlob(cfgDesc, `oci:${dir} config`);
  const diffIds = configDiffIds(config, `oci:${dir}`);
  const layerDescs = (Array.isArray(manifest.layers) ? manifest.layers : []).map((d, i) => descriptor(d, `oci:${dir} layers[${i}]`));
  if (layerDescs.length !== diffIds.length) {
    throw invalidArgument(`oci:${dir}: manifest has ${layerDescs.length} layers but the config ${diffIds.length} diff_ids`);
  }
  return {
    description: `oci:${dir}${tag !== undefined ? `:${tag}` : ''}`,
    manifest: { bytes: manifestBuf, mediaType: mt, digest: manifestDigest },
    blobs: {
      localPath: (d) => {
        const p = blobPath(d);
        return existsSync(p) ? p : undefined;
      },
      async fetchTo(d, size, path) {
        const p = blobPath(d);
        if (!existsSync(p)) throw notFound(`oci:${dir}: blob ${d} is missing`);
        await pipeline(verified(createReadStream(p) as AsyncIterable<Buffer>, d, size, `oci:${dir} blob ${d}`), createWriteStream(path));
      },
      async readRange(d, _size, start, length) {
        const p = blobPath(d);
        if (!existsSync(p)) throw notFound(`oci:${dir}: blob ${d} is missing`);
        const fh = await open(p, 'r');
        try {
          const buf = Buffer.alloc(length);
          const { bytesRead } = await fh.read(buf, 0, length, start);
          if (bytesRead !== length) throw invalidArgument(`oci:${dir}: blob ${d} is shorter than ${start + length} bytes`);
          return buf;
        } finally {
          await fh.close();
        }
      },
    },
    sourceDigest: manifestDigest,
    configDigest: cfgDesc.digest,
    config,
    layers: layerDescs.map((d, i) => ({
      name: `layer ${i + 1}/${layerDescs.length} (${d.digest})`,
      digest: d.digest,
      size: d.size,
      diffId: diffIds[i]!,
      open: async () => {
        const p = blobPath(d.digest);
        if (!existsSync(p)) throw notFound(`oci:${dir}: layer blob ${d.digest} is missing`);
        return createReadStream(p, { highWaterMark: 1 << 20 }); // 1 MiB reads: a sixteenth of the calls of the default
      },
    })),
    close: async () => undefined,
  };
}

// ---------------------------------------------------------------------------
// docker-archive (docker save)

interface Member {
  offset: number;
  size: number;
}

/** Indexes the regular files (and resolves symlinks) of an uncompressed tar file. */
async function indexTarFile(file: string): Promise<Map<string, Member>> {
  const members = new Map<string, Member>();
  const links = new Map<string, string>();
  const norm = (p: string) => posix.normalize(p).replace(/^(\.\/)+/, '').replace(/^\/+/, '');
  for await (const e of readTar(decompressed(createReadStream(file) as AsyncIterable<Buffer>))) {
    const name = norm(e.header.path);
    if (e.header.type === 'file') members.set(name, { offset: e.dataOffset, size: e.header.size });
    else if (e.header.type === 'symlink') links.set(name, norm(posix.join(posix.dirname(name), e.header.linkname)));
    else if (e.header.type === 'link') links.set(name, norm(e.header.linkname));
  }
  for (const [name] of links) {
    let target = name;
    for (let hop = 0; hop < 8 && !members.has(target) && links.has(target); hop++) target = links.get(target)!;
    const m = members.get(target);
    if (m) members.set(name, m);
  }
  return members;
}

export async function openDockerArchive(file: string, description = `docker-archive:${file}`, cleanup?: () => Promise<void>): Promise<SourceImage> {
  if (!existsSync(file) || !statSync(file).isFile()) throw notFound(`${description}: no such file`);
  const members = await indexTarFile(file);
  const read = (m: Member, start = 0) => createReadStream(file, { start: m.offset + start, end: m.offset + m.size - 1, highWaterMark: 1 << 20 });
  const memberBytes = async (name: string, what: string): Promise<Buffer> => {
    const m = members.get(name);
    if (!m) throw invalidArgument(`${description}: ${what} ${JSON.stringify(name)} is missing from the archive`);
    if (m.size > 64 * 1024 * 1024) throw invalidArgument(`${description}: ${what} too large`);
    if (m.size === 0) return Buffer.alloc(0);
    const parts: Buffer[] = [];
    for await (const c of read(m)) parts.push(c as Buffer);
    return Buffer.concat(parts);
  };
  const mf = JSON.parse((await memberBytes('manifest.json', 'manifest.json')).toString('utf8')) as unknown;
  if (!Array.isArray(mf) || mf.length === 0) throw invalidArgument(`${description}: manifest.json lists no image`);
  if (mf.length > 1) throw invalidArgument(`${description}: the archive holds ${mf.length} images; gear converts one`);
  const entry = mf[0] as { Config?: unknown; Layers?: unknown };
  if (typeof entry.Config !== 'string' || !Array.isArray(entry.Layers) || !entry.Layers.every((l) => typeof l === 'string')) {
    throw invalidArgument(`${description}: malformed manifest.json`);
  }
  const cfgName = posix.normalize(entry.Config);
  const cfgHex = /(?:^|\/)([a-f0-9]{64})(?:\.json)?$/.exec(cfgName)?.[1];
  let config = await memberBytes(cfgName, 'config');
  const configDigest = cfgHex ? `sha256:${cfgHex}` : `sha256:${(await import('node:crypto')).createHash('sha256').update(config).digest('hex')}`;
  if (cfgHex) config = await verifiedBytes((async function* () { yield config; })(), configDigest, undefined, `${description}: config`);
  const diffIds = configDiffIds(config, description);
  const layerNames = (entry.Layers as string[]).map((l) => posix.normalize(l));
  if (layerNames.length !== diffIds.length) {
    throw invalidArgument(`${description}: ${layerNames.length} layers but the config has ${diffIds.length} diff_ids`);
  }
  return {
    description,
    sourceDigest: configDigest,
    configDigest,
    config,
    layers: layerNames.map((name, i) => {
      const hex = /^blobs\/sha256\/([a-f0-9]{64})$/.exec(name)?.[1];
      const m = members.get(name);
      return {
        name: `layer ${i + 1}/${layerNames.length} (${name})`,
        ...(hex ? { digest: `sha256:${hex}`, size: m?.size } : {}),
        diffId: diffIds[i]!,
        open: async () => {
          if (!m) throw invalidArgument(`${description}: layer ${JSON.stringify(name)} is missing from the archive`);
          return m.size === 0 ? (async function* () {})() : read(m);
        },
      };
    }),
    close: cleanup ?? (async () => undefined),
  };
}

// ---------------------------------------------------------------------------
// docker-daemon

/** The unix socket path from --docker-host / DOCKER_HOST ("unix:///path"); default /var/run/docker.sock. */
export function dockerSocketPath(host?: string): string {
  const h = host ?? process.env.DOCKER_HOST ?? 'unix:///var/run/docker.sock';
  if (h.startsWith('unix://')) return h.slice('unix://'.length);
  if (h.startsWith('/')) return h;
  throw invalidArgument(`docker host ${JSON.stringify(h)}: only unix:// sockets are supported`);
}

export async function openDockerDaemon(image: string, dockerHost?: string, tmpParent = tmpdir()): Promise<SourceImage> {
  const socketPath = dockerSocketPath(dockerHost);
  const scratch = await claimScratch(tmpParent, 'gear-docker-save-');
  const file = join(scratch.dir, 'image.tar');
  const cleanup = () => scratch.release();
  try {
    await new Promise<void>((resolve, reject) => {
      const req = request({ socketPath, path: `/images/${encodeURIComponent(image)}/get`, method: 'GET' }, (res) => {
        if (res.statusCode !== 200) {
          const parts: Buffer[] = [];
          res.on('data', (c: Buffer) => parts.length < 64 && parts.push(c));
          res.on('end', () => {
            const msg = Buffer.concat(parts).toString('utf8').slice(0, 500).trim();
            const e = res.statusCode === 404 ? notFound(`docker-daemon:${image}: ${msg || 'no such image'}`) : unavailable(`docker-daemon:${image}: HTTP ${res.statusCode}: ${msg}`);
            reject(e);
          });
          return;
        }
        pipeline(res, createWriteStream(file)).then(resolve, (err) => reject(unavailable(`docker-daemon:${image}: reading the image from ${socketPath} failed`, err)));
      });
      req.on('error', (err) => reject(unavailable(`docker-daemon:${image}: cannot reach the Docker daemon at ${socketPath} (${(err as Error).message})`, err)));
      req.end();
    });
    return await openDockerArchive(file, `docker-daemon:${image}`, cleanup);
  } catch (err) {
    await cleanup();
    throw err;
  }
}

// ---------------------------------------------------------------------------
// registry

export async function openRegistryImage(reg: RegistryAccess, ref: string): Promise<SourceImage> {
  const img = await reg.resolveImage(ref);
  const mt = img.mediaType;
  if (mt !== OCI_MANIFEST && mt !== DOCKER_MANIFEST) throw invalidArgument(`${ref}: unsupported manifest media type ${mt}`);
  const cfg = img.config;
  const config = await reg.fetchBlob(cfg.digest, cfg.size);
  const diffIds = configDiffIds(config, ref);
  if (img.layers.length !== diffIds.length) {
    throw invalidArgument(`${ref}: manifest has ${img.layers.length} layers but the config ${diffIds.length} diff_ids`);
  }
  return {
    description: ref,
    manifest: { bytes: img.bytes, mediaType: img.mediaType, digest: img.digest },
    blobs: {
      repository: { registry: reg.ref.registry, repository: reg.ref.repository },
      fetchTo: (d, size, path) => reg.fetchBlobTo(d, size, path),
      readRange: (d, size, start, length) => reg.readRange(d, size, start, length),
    },
    sourceDigest: img.digest,
    configDigest: cfg.digest,
    config,
    layers: img.layers.map((d, i) => ({
      name: `layer ${i + 1}/${img.layers.length} (${d.digest})`,
      digest: d.digest,
      size: d.size,
      diffId: diffIds[i]!,
      open: () => reg.openBlob(d.digest, d.size),
    })),
    close: async () => undefined,
  };
}

/** A source string's kind, for parseSource callers. */
export type SourceSpec =
  | { kind: 'docker-archive'; file: string }
  | { kind: 'docker-daemon'; image: string }
  | { kind: 'oci'; arg: string }
  | { kind: 'registry'; ref: string };

export function parseSourceSpec(src: string): SourceSpec {
  if (src.startsWith('docker-archive:')) return { kind: 'docker-archive', file: src.slice('docker-archive:'.length) };
  if (src.startsWith('docker-daemon:')) return { kind: 'docker-daemon', image: src.slice('docker-daemon:'.length) };
  if (src.startsWith('oci:')) return { kind: 'oci', arg: src.slice('oci:'.length) };
  if (src.startsWith('docker://')) return { kind: 'registry', ref: src.slice('docker://'.length) };
  return { kind: 'registry', ref: src };
}

