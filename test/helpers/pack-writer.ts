/**
 * A small format v3 pack writer for tests (docs/format.md §10), until
 * `gear convert --format-version 3` is on this branch: lays out contents in
 * packs, each member compressed on its own with zstd (one frame, content
 * size in the header) when that saves 10%, else raw; contents of at
 * least `chunkAbove` bytes are chunked in `chunkSize` chunks.
 *
 *   const { packs, files } = buildPacks([bufA, bufB, big], { chunkAbove: 4 << 20 });
 *   // packs[i]: a pack blob to push; files[k]: where contents[k] lives
 */
import { createHash } from 'node:crypto';
import { zstdCompress } from '../../src/core/sys/zstd.js';
import type { ChunkList, MemberRef, PackLoc } from '../../src/core/fetcher/pack-types.js';
import type { GearBlobTuple } from '../../src/core/lazy/catalog.js';

export const sha256 = (b: Buffer): string => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** One zstd frame of `b` (level 3, with its content size): the native addon, as gear convert uses it. */
export function zstdFrame(b: Buffer): Buffer {
  return zstdCompress(b, 3);
}

/** Where one content lives, as the index of format v3 says (pack given by index). */
export interface PackedFile {
  digest: string;
  size: number;
  member?: { pack: number; offset: number; length: number; encoding: 'zstd' | 'raw' };
  chunkSize?: number;
  chunks?: Array<{ pack: number; offset: number; length: number; encoding: 'zstd' | 'raw'; digest: string }>;
}

export interface BuildOptions {
  /** Stored bytes per pack at most (a chunked file's chunks may end a pack). Default 32 MiB. */
  packBytes?: number;
  chunkAbove?: number;
  chunkSize?: number;
  /** 'auto' (zstd when it saves 10%), or force one. */
  encoding?: 'auto' | 'zstd' | 'raw';
}

export function buildPacks(contents: Buffer[], opts: BuildOptions = {}): { packs: Buffer[]; packRefs: PackLoc[]; files: PackedFile[] } {
  const packBytes = opts.packBytes ?? 32 << 20;
  const chunkAbove = opts.chunkAbove ?? 4 << 20;
  const chunkSize = opts.chunkSize ?? 1 << 20;
  const enc = opts.encoding ?? 'auto';
  const packs: Buffer[][] = [[]];
  let cur = 0;
  let off = 0;
  const put = (b: Buffer): { pack: number; offset: number; length: number; encoding: 'zstd' | 'raw' } => {
    let stored = b;
    let encoding: 'zstd' | 'raw' = 'raw';
    if (enc !== 'raw') {
      const z = zstdFrame(b);
      if (enc === 'zstd' || z.length <= b.length * 0.9) {
        stored = z;
        encoding = 'zstd';
      }
    }
    if (off > 0 && off + stored.length > packBytes) {
      packs.push([]);
      cur++;
      off = 0;
    }
    packs[cur]!.push(stored);
    const m = { pack: cur, offset: off, length: stored.length, encoding };
    off += stored.length;
    return m;
  };
  const files: PackedFile[] = [];
  const seen = new Map<string, PackedFile>();
  for (const c of contents) {
    const digest = sha256(c);
    const had = seen.get(digest);
    if (had) {
      files.push(had);
      continue;
    }
    let f: PackedFile;
    if (c.length >= chunkAbove) {
      const chunks = [];
      for (let s = 0; s < c.length; s += chunkSize) {
        const part = c.subarray(s, s + chunkSize);
        chunks.push({ ...put(part), digest: sha256(part) });
      }
      f = { digest, size: c.length, chunkSize, chunks };
    } else {
      f = { digest, size: c.length, member: put(c) };
    }
    seen.set(digest, f);
    files.push(f);
  }
  const blobs = packs.filter((p) => p.length > 0).map((p) => Buffer.concat(p));
  return { packs: blobs, packRefs: blobs.map((b) => ({ digest: sha256(b), size: b.length })), files };
}

/** The fetcher's view of a packed file (pack index resolved). */
export function layoutOf(f: PackedFile, packRefs: PackLoc[]): { member?: MemberRef; chunks?: ChunkList } {
  if (f.member) return { member: { ...f.member, pack: packRefs[f.member.pack]! } };
  const cs = f.chunkSize!;
  return {
    chunks: {
      chunkSize: cs,
      chunks: f.chunks!.map((c, i) => ({ ...c, pack: packRefs[c.pack]!, bytes: Math.min(cs, f.size - i * cs) })),
    },
  };
}

/** The catalog's tuples of files (as an index layer's record holds them: layers/types.ts GearBlobTuple). */
export function blobTuplesOf(files: readonly PackedFile[]): GearBlobTuple[] {
  return files.map((f): GearBlobTuple =>
    f.member
      ? [f.digest, f.size, { p: f.member.pack, o: f.member.offset, l: f.member.length, ...(f.member.encoding === 'raw' ? { e: 'raw' as const } : {}) }]
      : [f.digest, f.size, { cs: f.chunkSize!, c: f.chunks!.map((c): [number, number, number, string, 1?] => (c.encoding === 'raw' ? [c.pack, c.offset, c.length, c.digest, 1] : [c.pack, c.offset, c.length, c.digest])) }],
  );
}
