/**
 * Conversion destinations: a registry repository (through the registry
 * client) or an OCI image layout directory. Both take blobs first and
 * manifests last, so a destination never holds a manifest whose blobs are
 * missing.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { invalidArgument } from '../core/errors.js';
import type { BlobLocation } from '../core/index/manifest.js';
import { SourceDigestError } from './layer-stream.js';
import type { RegistryAccess } from './registry-adapter.js';
import { splitOciArg } from './source.js';

export interface Destination {
  kind: 'registry' | 'oci';
  description: string;
  /** Where Gear files will be found by a driver (recorded in the index), if known. */
  location?: BlobLocation;
  /** The tag the image is written under. */
  tag: string;
  /** Stores a blob from a file unless present. */
  pushFile(digest: string, size: number, path: string): Promise<'exists' | 'uploaded'>;
  pushBytes(digest: string, bytes: Buffer): Promise<'exists' | 'uploaded'>;
  /** True when the destination holds the blob already. */
  hasBlob(digest: string): Promise<boolean>;
  /**
   * Registry destinations: mounts a blob from another repository of the same
   * registry (no bytes sent). False when the registry declined (then upload).
   */
  mountBlob?(digest: string, from: BlobLocation): Promise<boolean>;
  /** Stores a manifest by digest (reference "sha256:…") or under a tag; returns its digest. */
  putManifest(reference: string, bytes: Buffer, mediaType: string): Promise<string>;
  getManifest(tag: string): Promise<{ bytes: Buffer; mediaType: string } | undefined>;
  /** Registry destinations: true when the registry serves the OCI referrers API. */
  hasReferrersApi?(digest: string): Promise<boolean>;
  close(): Promise<void>;
}

export function registryDestination(reg: RegistryAccess): Destination {
  return {
    kind: 'registry',
    description: `${reg.ref.registry}/${reg.ref.repository}:${reg.ref.tag ?? 'latest'}`,
    location: { registry: reg.ref.registry, repository: reg.ref.repository },
    tag: reg.ref.tag ?? 'latest',
    pushFile: (d, s, p) => reg.pushFile(d, s, p),
    pushBytes: (d, b) => reg.pushBytes(d, b),
    hasBlob: (d) => reg.hasBlob(d),
    async mountBlob(d, from) {
      if (from.registry !== reg.ref.registry || from.repository === reg.ref.repository) return false;
      return reg.mountBlob(d, from);
    },
    putManifest: (r, b, m) => reg.putManifest(r, b, m),
    getManifest: (t) => reg.getManifest(t),
    hasReferrersApi: (d) => reg.hasReferrersApi(d),
    close: () => reg.close(),
  };
}

const REF_NAME = 'org.opencontainers.image.ref.name';

/**
 * An OCI image layout (image-spec "image-layout"): blobs/sha256/<hex>,
 * oci-layout, index.json. Blobs are written to a temp name, verified and
 * renamed; index.json is replaced atomically.
 */
export async function ociLayoutDestination(arg: string, location?: BlobLocation): Promise<Destination> {
  const { dir, tag } = splitOciArg(arg);
  if (!dir) throw invalidArgument('oci: destination needs a directory');
  const blobs = join(dir, 'blobs', 'sha256');
  await mkdir(blobs, { recursive: true });
  if (!existsSync(join(dir, 'oci-layout'))) {
    await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  }
  let seq = 0;
  const blobPath = (d: string) => {
    if (!/^sha256:[a-f0-9]{64}$/.test(d)) throw invalidArgument(`oci:${dir}: invalid blob digest ${JSON.stringify(d.slice(0, 80))}`);
    return join(blobs, d.slice('sha256:'.length));
  };
  const store = async (digest: string, write: (tmp: string) => Promise<void>): Promise<'exists' | 'uploaded'> => {
    if (existsSync(blobPath(digest))) return 'exists';
    const tmp = join(blobs, `.tmp-${process.pid}-${seq++}`);
    try {
      await write(tmp);
      const h = createHash('sha256');
      for await (const c of createReadStream(tmp)) h.update(c as Buffer);
      if (`sha256:${h.digest('hex')}` !== digest) throw new SourceDigestError(`oci layout: content written for ${digest} does not match it`);
      await rename(tmp, blobPath(digest));
    } finally {
      await rm(tmp, { force: true });
    }
    return 'uploaded';
  };
  const readIndex = async (): Promise<{ schemaVersion: number; mediaType?: string; manifests: Record<string, unknown>[] }> => {
    try {
      const v = JSON.parse(await readFile(join(dir, 'index.json'), 'utf8'));
      if (!Array.isArray(v.manifests)) throw new Error('no manifests');
      return v;
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') return { schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [] };
      throw invalidArgument(`oci:${dir}: index.json is malformed`, err);
    }
  };
  return {
    kind: 'oci',
    description: `oci:${dir}:${tag ?? 'latest'}`,
    location,
    tag: tag ?? 'latest',
    pushFile: (digest, _size, path) => store(digest, (tmp) => pipeline(createReadStream(path), createWriteStream(tmp))),
    pushBytes: (digest, bytes) => store(digest, (tmp) => writeFile(tmp, bytes)),
    hasBlob: async (digest) => existsSync(blobPath(digest)),
    async putManifest(reference, bytes, mediaType) {
      const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
      await store(digest, (tmp) => writeFile(tmp, bytes));
      if (reference.startsWith('sha256:')) return digest;
      const index = await readIndex();
      index.manifests = index.manifests.filter((m) => (m.annotations as Record<string, string> | undefined)?.[REF_NAME] !== reference);
      index.manifests.push({ mediaType, digest, size: bytes.length, annotations: { [REF_NAME]: reference } });
      const tmp = join(dir, `.index.json.tmp-${process.pid}`);
      await writeFile(tmp, JSON.stringify(index));
      await rename(tmp, join(dir, 'index.json'));
      return digest;
    },
    async getManifest(t) {
      const index = await readIndex();
      const d = index.manifests.find((m) => (m.annotations as Record<string, string> | undefined)?.[REF_NAME] === t);
      if (!d || typeof d.digest !== 'string' || !/^sha256:[a-f0-9]{64}$/.test(d.digest)) return undefined;
      return { bytes: await readFile(blobPath(d.digest)), mediaType: String(d.mediaType) };
    },
    close: async () => undefined,
  };
}
