/**
 * Format version 3 pack layout (docs/format.md §10.3), pure logic:
 *
 * - which contents are chunked (CHUNK_MIN_FILE_BYTES and up, CHUNK_BYTES chunks);
 * - whether a member is stored zstd or raw (zstd when it saves at least 10%);
 * - the order contents are laid out in: the prefetch list first (in list
 *   order), then path order of each content's first path;
 * - cutting that sequence of members into packs of at most PACK_MAX_BYTES
 *   stored bytes: a one-member content that does not fit the rest of the
 *   current pack starts the next one; a chunked content's chunks follow each
 *   other in order, starting a new pack only between chunks.
 *
 * The layout depends only on its input (member lengths), so a rerun of a
 * killed conversion plans the same packs and can reuse the complete ones.
 */

/** Packs are filled up to this many stored bytes. */
export const PACK_MAX_BYTES = 32 * 1024 * 1024;
/** Files of at least this size are chunked. */
export const CHUNK_MIN_FILE_BYTES = 4 * 1024 * 1024;
/** Chunk size of chunked files (every chunk but the last). */
export const CHUNK_BYTES = 1024 * 1024;
/** A member is stored zstd when the frame is at most this fraction of its bytes. */
export const ZSTD_WORTH_IT = 0.9;

export type Encoding = 'zstd' | 'raw';

/** The stored form chosen for a member of `size` bytes whose zstd frame is `compressed` bytes. */
export function memberEncoding(size: number, compressed: number): Encoding {
  return compressed <= size * ZSTD_WORTH_IT ? 'zstd' : 'raw';
}

/** How many chunks a content of `size` bytes has (0: stored as one member). */
export function chunkCount(size: number, minFile = CHUNK_MIN_FILE_BYTES, chunk = CHUNK_BYTES): number {
  return size >= minFile ? Math.ceil(size / chunk) : 0;
}

export interface LayoutMember {
  /** Stored bytes. */
  length: number;
}

export interface LayoutContent<M extends LayoutMember = LayoutMember> {
  digest: string;
  /** One member (a whole file) or its chunks in order. */
  members: M[];
}

export interface PlannedPack<M extends LayoutMember = LayoutMember> {
  /** Members in pack order with their offsets. */
  members: { member: M; offset: number }[];
  size: number;
}

/**
 * The digests of `files` (in path order, each with its first path first) in
 * layout order: the contents of `prefetch` paths in list order, then every
 * other content by its first path. Each digest once.
 */
export function layoutOrder(files: readonly { path: string; digest: string }[], prefetch?: readonly string[]): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  if (prefetch?.length) {
    const byPath = new Map(files.map((f) => [f.path, f.digest]));
    for (const p of prefetch) {
      const d = byPath.get(p);
      if (d !== undefined && !seen.has(d)) {
        seen.add(d);
        out.push(d);
      }
    }
  }
  for (const f of files) {
    if (!seen.has(f.digest)) {
      seen.add(f.digest);
      out.push(f.digest);
    }
  }
  return out;
}

/**
 * Cuts a sequence of contents into packs of at most `maxBytes` stored bytes
 * (a member longer than that gets a pack of its own), one content at a time:
 * a pack is handed to `onPack` as soon as it is full, so it can be written
 * while later contents are still coming (early-packs.ts).
 */
export class PackCutter<M extends LayoutMember> {
  private cur?: PlannedPack<M>;

  constructor(
    private readonly onPack: (pack: PlannedPack<M>) => void,
    private readonly maxBytes = PACK_MAX_BYTES,
  ) {}

  /** The members of one content (one member, or its chunks in order). */
  add(members: readonly M[]): void {
    if (members.length === 0) return;
    const total = members.reduce((s, m) => s + m.length, 0);
    // A content that fits a pack but not the rest of this one starts the next pack (read in one range).
    if (this.cur && this.cur.size > 0 && this.cur.size + total > this.maxBytes && total <= this.maxBytes) this.close();
    for (const m of members) {
      if (this.cur && this.cur.size > 0 && this.cur.size + m.length > this.maxBytes) this.close();
      this.cur ??= { members: [], size: 0 };
      this.cur.members.push({ member: m, offset: this.cur.size });
      this.cur.size += m.length;
    }
  }

  /** Hands over the last pack, if any member is in it. */
  close(): void {
    const p = this.cur;
    this.cur = undefined;
    if (p) this.onPack(p);
  }
}

/**
 * Cuts the members of `contents` (in the given order) into packs of at most
 * `maxBytes` stored bytes (a member longer than that gets a pack of its own).
 */
export function layoutPacks<M extends LayoutMember>(contents: readonly LayoutContent<M>[], maxBytes = PACK_MAX_BYTES): PlannedPack<M>[] {
  const packs: PlannedPack<M>[] = [];
  const cutter = new PackCutter<M>((p) => packs.push(p), maxBytes);
  for (const c of contents) cutter.add(c.members);
  cutter.close();
  return packs;
}
