/**
 * Where the bytes of a Gear file live in format version 3 (docs/format.md
 * §10): a member of a pack blob, or a list of chunks (each a member). The
 * node-side vocabulary of the fetcher and the catalog; the codec's own types
 * (index/manifest.ts: PackRef, PackMember, FileChunk) map onto these with the
 * pack index resolved to the pack itself.
 */

/** How a member is stored: one zstd frame of its bytes, or the bytes themselves. */
export type MemberEncoding = 'zstd' | 'raw';

/** A pack blob: a registry blob, addressed by digest, of a known size. */
export interface PackLoc {
  digest: string;
  size: number;
}

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

/** The largest member a node decompresses in memory (format §10.1: a one-member file is at most 64 MiB). */
export const MAX_MEMBER_BYTES = 64 * 1024 * 1024;

/** The most stored bytes a zstd member of `bytes` decompressed bytes may take (format §10.1). */
export function maxStoredLength(bytes: number, encoding: MemberEncoding): number {
  return encoding === 'raw' ? bytes : bytes + Math.floor(bytes / 128) + 1024;
}
