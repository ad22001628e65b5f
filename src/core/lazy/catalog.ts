/**
 * Which Gear files the node knows about, and where each one lives: the union
 * of the index manifests of the index layers in the layer store. The miss
 * filesystem only serves digests listed here (any other LOOKUP is ENOENT), so
 * a container can never make the daemon fetch arbitrary blobs.
 */
import type { BlobLocation, StoredBlob } from '../index/manifest.js';
import type { FetchRequest } from '../fetcher/fetcher.js';

/** One Gear file as a layer record stores it: [digest, size, blobDigest?, blobSize?]. */
export type GearBlobTuple = [digest: string, size: number, blobDigest?: string, blobSize?: number];

interface Known {
  size: number;
  blob?: StoredBlob | undefined;
  /** owner (layer id) → location (absent when the index names none) */
  where: Map<string, BlobLocation>;
  owners: Set<string>;
}

export class BlobCatalog {
  private readonly byDigest = new Map<string, Known>();
  private readonly byOwner = new Map<string, string[]>();

  /** Registers the files of one index layer (replacing what `owner` had). */
  add(owner: string, location: BlobLocation | undefined, blobs: GearBlobTuple[]): void {
    this.remove(owner);
    const digests: string[] = [];
    for (const [digest, size, blobDigest, blobSize] of blobs) {
      let k = this.byDigest.get(digest);
      if (!k) {
        k = { size, where: new Map(), owners: new Set() };
        if (blobDigest && blobSize) k.blob = { mediaType: 'application/vnd.gear.file.v1+gzip', digest: blobDigest, size: blobSize };
        this.byDigest.set(digest, k);
      }
      k.owners.add(owner);
      if (location) k.where.set(owner, location);
      digests.push(digest);
    }
    this.byOwner.set(owner, digests);
  }

  remove(owner: string): void {
    const digests = this.byOwner.get(owner);
    if (!digests) return;
    this.byOwner.delete(owner);
    for (const d of digests) {
      const k = this.byDigest.get(d);
      if (!k) continue;
      k.where.delete(owner);
      k.owners.delete(owner);
      if (k.owners.size === 0) this.byDigest.delete(d);
    }
  }

  has(digest: string): boolean {
    return this.byDigest.has(digest);
  }

  sizeOf(digest: string): number | undefined {
    return this.byDigest.get(digest)?.size;
  }

  /** Fetch requests for a digest, one per distinct location (most recently added owner last). */
  requests(digest: string): FetchRequest[] {
    const k = this.byDigest.get(digest);
    if (!k) return [];
    const seen = new Set<string>();
    const out: FetchRequest[] = [];
    for (const loc of k.where.values()) {
      const key = `${loc.registry}/${loc.repository}`;
      if (seen.has(key)) continue;
      seen.add(key);
      out.push({ digest, size: k.size, blob: k.blob, location: loc });
    }
    return out;
  }

  get owners(): number {
    return this.byOwner.size;
  }

  get files(): number {
    return this.byDigest.size;
  }
}
