/**
 * The small surface of the registry client (src/core/registry) that convert
 * uses, bound to one repository. Keeping it narrow lets the converter be
 * tested against an OCI layout and keeps every HTTP detail in the client.
 */
import { arch } from 'node:process';
import { RegistryClient, fileBlobSource } from '../core/registry/client.js';
import type { RegistryClientOptions } from '../core/registry/client.js';
import { parseReference, formatReference, type ImageReference } from '../core/registry/reference.js';

export interface RemoteDescriptor {
  mediaType: string;
  digest: string;
  size: number;
}

export interface RegistryAccess {
  readonly ref: ImageReference;
  resolveImage(ref: string): Promise<{ digest: string; mediaType: string; bytes: Buffer; config: RemoteDescriptor; layers: RemoteDescriptor[] }>;
  fetchBlob(digest: string, size: number): Promise<Buffer>;
  /** Downloads a blob into `path`, verified against digest and size (the file is removed on failure). */
  fetchBlobTo(digest: string, size: number, path: string): Promise<void>;
  /** True when the repository holds the blob (HEAD). */
  hasBlob(digest: string): Promise<boolean>;
  /** Cross-repository mount from another repository of the same registry; false when the registry declined. */
  mountBlob(digest: string, from: { registry: string; repository: string }): Promise<boolean>;
  openBlob(digest: string, size: number): Promise<AsyncIterable<Uint8Array>>;
  /** Bytes start … start+length−1 of a blob of `size` bytes (an HTTP Range request; not verified: the caller checks). */
  readRange(digest: string, size: number, start: number, length: number): Promise<Buffer>;
  /** HEAD first; uploads from the file only when absent. */
  pushFile(digest: string, size: number, path: string): Promise<'exists' | 'uploaded'>;
  pushBytes(digest: string, bytes: Buffer): Promise<'exists' | 'uploaded'>;
  putManifest(reference: string, bytes: Buffer, mediaType: string): Promise<string>;
  /** A manifest by tag, or undefined when the tag does not exist. */
  getManifest(tag: string): Promise<{ bytes: Buffer; mediaType: string } | undefined>;
  /** True when the registry serves the OCI referrers API (asked about `digest`). */
  hasReferrersApi(digest: string): Promise<boolean>;
  close(): Promise<void>;
}

const GO_ARCH: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x' };

/** True when an index entry's platform fits this host (linux/<arch>), or has none. */
export function platformMatches(p?: { os?: string; architecture?: string }): boolean {
  if (!p) return true;
  return (p.os === undefined || p.os === 'linux') && (p.architecture === undefined || p.architecture === (GO_ARCH[arch] ?? arch));
}

/** Opens a repository through the shared registry client. */
export function openRegistry(refText: string, client: RegistryClient): RegistryAccess {
  const ref = parseReference(refText);
  const repo = { registry: ref.registry, repository: ref.repository };
  return {
    ref,
    async resolveImage(r) {
      const img = await client.resolveImage(r);
      return { digest: img.digest, mediaType: img.mediaType, bytes: img.bytes, config: img.manifest.config, layers: img.manifest.layers };
    },
    fetchBlob: (digest, size) => client.fetchBlob(repo, digest, { expectedSize: size }),
    async fetchBlobTo(digest, size, path) {
      await client.fetchBlobVerified(repo, digest, path, { expectedSize: size });
    },
    hasBlob: async (digest) => (await client.statBlob(repo, digest)) !== undefined,
    mountBlob: (digest, from) => client.mountBlob(repo, digest, from),
    async openBlob(digest, size) {
      const s = await client.openBlob(repo, digest, { expectedSize: size });
      return s.stream;
    },
    async readRange(digest, size, start, length) {
      const s = await client.openBlob(repo, digest, { expectedSize: size, range: { start, end: start + length - 1 } });
      const parts: Buffer[] = [];
      let n = 0;
      for await (const c of s.stream) {
        n += (c as Buffer).length;
        if (n > length) throw new Error(`GET ${digest} bytes ${start}+${length}: more bytes than asked for`);
        parts.push(c as Buffer);
      }
      if (n !== length) throw new Error(`GET ${digest} bytes ${start}+${length}: ${n} bytes came`);
      return Buffer.concat(parts);
    },
    async pushFile(digest, size, path) {
      const r = await client.pushBlob(repo, digest, fileBlobSource(path, size));
      return r.status === 'uploaded' ? 'uploaded' : 'exists';
    },
    async pushBytes(digest, bytes) {
      const r = await client.pushBlob(repo, digest, bytes);
      return r.status === 'uploaded' ? 'uploaded' : 'exists';
    },
    async putManifest(reference, bytes, mediaType) {
      const target = reference.startsWith('sha256:') ? { ...repo, digest: reference } : { ...repo, tag: reference };
      return (await client.putManifest(target, bytes, { mediaType })).digest;
    },
    async getManifest(tag) {
      const head = await client.headManifest({ ...repo, tag });
      if (!head) return undefined;
      // The destination's own manifest: never from a mirror (it may lag).
      const m = await client.getManifest({ ...repo, tag }, { noMirrors: true });
      return { bytes: m.bytes, mediaType: m.mediaType };
    },
    hasReferrersApi: async (digest) => (await client.getReferrers(repo, digest)) !== undefined,
    close: () => client.close(),
  };
}

export function newRegistryClient(opts: RegistryClientOptions = {}): RegistryClient {
  return new RegistryClient(opts);
}

export { formatReference };
