/**
 * Media types of the OCI image spec and Docker's image manifest v2 schema 2,
 * and the manifest JSON shapes the registry client reads and writes.
 *
 * Shapes are the wire form; every field read from a registry is validated by
 * `parseManifest` before use (a registry is untrusted input).
 */
import { invalidArgument } from '../errors.js';
import { isDigest } from './digest.js';

export const MediaType = {
  OciManifest: 'application/vnd.oci.image.manifest.v1+json',
  OciIndex: 'application/vnd.oci.image.index.v1+json',
  OciConfig: 'application/vnd.oci.image.config.v1+json',
  OciLayer: 'application/vnd.oci.image.layer.v1.tar',
  OciLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  OciLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  OciEmpty: 'application/vnd.oci.empty.v1+json',
  DockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  DockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  DockerConfig: 'application/vnd.docker.container.image.v1+json',
  DockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  DockerForeignLayerGzip: 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
} as const;

/** Media types of a single-platform image manifest. */
export const IMAGE_MANIFEST_TYPES: readonly string[] = [MediaType.OciManifest, MediaType.DockerManifest];
/** Media types of a multi-platform index / manifest list. */
export const INDEX_TYPES: readonly string[] = [MediaType.OciIndex, MediaType.DockerManifestList];
/** The Accept list sent when fetching a manifest: every type this client understands. */
export const MANIFEST_ACCEPT: readonly string[] = [...IMAGE_MANIFEST_TYPES, ...INDEX_TYPES];

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
  'os.version'?: string;
  'os.features'?: string[];
}

/** An OCI content descriptor. `urls` is kept but never followed with credentials (CVE-2020-15157). */
export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  urls?: string[];
  annotations?: Record<string, string>;
  platform?: Platform;
  artifactType?: string;
}

export interface ImageManifest {
  schemaVersion: 2;
  mediaType?: string;
  artifactType?: string;
  config: Descriptor;
  layers: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

export interface ImageIndex {
  schemaVersion: 2;
  mediaType?: string;
  artifactType?: string;
  manifests: Descriptor[];
  subject?: Descriptor;
  annotations?: Record<string, string>;
}

export type Manifest = ImageManifest | ImageIndex;

export function isIndexMediaType(mt: string): boolean {
  return INDEX_TYPES.includes(mt);
}

export function isImageManifestMediaType(mt: string): boolean {
  return IMAGE_MANIFEST_TYPES.includes(mt);
}

function checkDescriptor(d: unknown, where: string): Descriptor {
  if (!d || typeof d !== 'object') throw invalidArgument(`${where}: descriptor is not an object`);
  const o = d as Record<string, unknown>;
  if (typeof o.mediaType !== 'string' || o.mediaType.length > 255) {
    throw invalidArgument(`${where}: descriptor mediaType missing or invalid`);
  }
  if (typeof o.digest !== 'string' || !isDigest(o.digest)) {
    throw invalidArgument(`${where}: descriptor digest is not a sha256 digest`);
  }
  if (typeof o.size !== 'number' || !Number.isSafeInteger(o.size) || o.size < 0) {
    throw invalidArgument(`${where}: descriptor size invalid`);
  }
  return o as unknown as Descriptor;
}

/**
 * Parse and validate manifest bytes. `mediaType` is the Content-Type the
 * registry sent (or the caller's); the document's own `mediaType` wins when
 * present and must be consistent with it. Throws InvalidArgument.
 */
export function parseManifest(bytes: Uint8Array, mediaType?: string): { mediaType: string; manifest: Manifest } {
  let doc: unknown;
  try {
    doc = JSON.parse(Buffer.from(bytes).toString('utf8'));
  } catch (err) {
    throw invalidArgument('manifest is not valid JSON', err);
  }
  if (!doc || typeof doc !== 'object' || Array.isArray(doc)) throw invalidArgument('manifest is not a JSON object');
  const o = doc as Record<string, unknown>;
  if (o.schemaVersion !== 2) throw invalidArgument(`unsupported manifest schemaVersion ${String(o.schemaVersion)}`);
  let mt = typeof o.mediaType === 'string' ? o.mediaType : undefined;
  const headerType = mediaType?.split(';')[0]?.trim();
  if (!mt) {
    if (headerType && MANIFEST_ACCEPT.includes(headerType)) mt = headerType;
    else mt = Array.isArray(o.manifests) ? MediaType.OciIndex : MediaType.OciManifest;
  }
  if (isIndexMediaType(mt)) {
    if (!Array.isArray(o.manifests)) throw invalidArgument('index has no manifests array');
    o.manifests.forEach((d, i) => checkDescriptor(d, `manifests[${i}]`));
  } else if (isImageManifestMediaType(mt)) {
    checkDescriptor(o.config, 'config');
    if (!Array.isArray(o.layers)) throw invalidArgument('manifest has no layers array');
    o.layers.forEach((d, i) => checkDescriptor(d, `layers[${i}]`));
  } else {
    throw invalidArgument(`unsupported manifest media type ${JSON.stringify(mt)}`);
  }
  return { mediaType: mt, manifest: o as unknown as Manifest };
}
