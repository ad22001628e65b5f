/**
 * Where the bytes of a Gear file live in format version 3 (docs/format.md
 * §10): a member of a pack blob, or a list of chunks (each a member). The
 * node-side vocabulary of the fetcher and the catalog; the codec's own types
 * (index/manifest.ts: PackRef, PackMember, FileChunk) map onto these with the
 * pack index resolved to the pack itself.
 */

import type { BlobLocation, MemberEncoding, PackRef, StoredBlob } from '../index/manifest.js';

export type { MemberEncoding };
/** A pack blob: a registry blob, addressed by digest, of a known size (the codec's PackRef). */
export type PackLoc = PackRef;

/** Bytes offset … offset+length−1 of `pack`, stored with `encoding`. */
export interface MemberRef {
  pack: PackLoc;
  offset: number;
  length: number;
  encoding: MemberEncoding;
}

/** One chunk of a chunked file: a member whose decompressed bytes (`bytes` of them) hash to `digest`. */
export interface ChunkRef extends MemberRef {
  digest: string;
  /** Decompressed byte count (chunkSize, or less for the last chunk). */
  bytes: number;
}

/** A chunked file's layout. */
export interface ChunkList {
  chunkSize: number;
  chunks: ChunkRef[];
}

/** What the fetcher is asked for: one content, where it lives and how it is stored (fetcher.ts, chunked.ts, range-read.ts). */
export interface FetchRequest {
  /** Content digest (the pool key). */
  digest: string;
  /** Content size in bytes. */
  size: number;
  /** The stored form when not raw (gzip). */
  blob?: StoredBlob | undefined;
  /** Where the blob lives. */
  location: BlobLocation;
  /** Format v3: the content is this member of a pack (pack-fetch.ts); `blob` is then absent. */
  member?: MemberRef | undefined;
  /** Format v3: the content is these chunks (chunked.ts). */
  chunks?: ChunkList | undefined;
}
