/**
 * Format version 3 (docs/format.md §10): where the bytes of a file are
 * stored. A file's content is one member of a pack blob (`pack`, `offset`,
 * `length`, `encoding`) or a list of chunks, each a member with its own
 * digest. This file decodes, validates and encodes those members; the rest of
 * the manifest is manifest.ts.
 *
 * Everything here is hostile input until checked: every index is bounded by
 * its array, every range by its pack's size (no overflow: all values are safe
 * integers and the sums stay below 2^53), every length by the member's byte
 * count, and two members of one pack either do not overlap or are the same
 * bytes.
 */
import { invalidArgument } from '../errors.js';
import { shown, type Where } from './shown.js';

/** A pack blob (media type application/vnd.gear.pack.v1) of the image's repository. */
export interface PackRef {
  digest: string;
  size: number;
}

/** `zstd`: one zstd frame of the member's bytes; `raw`: the bytes themselves. */
export type MemberEncoding = 'zstd' | 'raw';

/** Bytes `offset … offset+length−1` of `packs[pack]`, stored with `encoding`. */
export interface PackMember {
  pack: number;
  offset: number;
  length: number;
  encoding: MemberEncoding;
}

/** One chunk of a chunked file: a member whose decompressed bytes have the sha256 `digest`. */
export interface FileChunk extends PackMember {
  digest: string;
}

/** The v3 storage members of a file with content (exactly one of `member`, `chunks`). */
export interface PackedContent {
  member?: PackMember;
  chunkSize?: number;
  chunks?: FileChunk[];
}

/** At most this many packs in one index. */
export const MAX_PACKS = 1_000_000;
/** A file stored as one member is at most this big (a node decompresses a member in memory). */
export const MAX_MEMBER_FILE_BYTES = 64 * 1024 * 1024;
/** Bounds of `chunkSize`. */
export const MIN_CHUNK_SIZE = 64 * 1024;
export const MAX_CHUNK_SIZE = 16 * 1024 * 1024;
/** At most this many chunks per file. */
export const MAX_CHUNKS = 1_048_576;

const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;

/** The most bytes a zstd frame of `n` bytes of content may take (docs/format.md §10.1). */
export function maxZstdLength(n: number): number {
  return n + Math.floor(n / 128) + 1024;
}

/** Byte count of chunk `i` of a chunked file of `size` bytes. */
export function chunkBytes(file: { size: number; chunkSize?: number }, i: number): number {
  const c = file.chunkSize!;
  return Math.min(c, file.size - i * c);
}

function wholeIn(v: unknown, min: number, max: number, what: string, where: Where): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    throw invalidArgument(`${where}: "${what}" must be a whole number in ${min}…${max}, not ${shown(v)}`);
  }
  return v;
}

/** Decodes and validates the `packs` member of a version 3 manifest. */
export function decodePacks(v: unknown): PackRef[] {
  if (!Array.isArray(v)) throw invalidArgument(`gear index: version 3 needs "packs" as an array, not ${shown(v)}`);
  if (v.length > MAX_PACKS) throw invalidArgument(`gear index: "packs" lists ${v.length} packs, beyond the ${MAX_PACKS} allowed`);
  const seen = new Set<string>();
  const out: PackRef[] = new Array(v.length);
  for (let i = 0; i < v.length; i++) {
    const p = v[i] as Record<string, unknown>;
    const where = `gear index: packs[${i}]`;
    if (!p || typeof p !== 'object' || Array.isArray(p)) throw invalidArgument(`${where}: must be an object {digest, size}, not ${shown(p)}`);
    if (typeof p.digest !== 'string' || !DIGEST_RE.test(p.digest)) throw invalidArgument(`${where}: "digest" must be sha256:<64 lowercase hex>, not ${shown(p.digest)}`);
    if (seen.has(p.digest)) throw invalidArgument(`${where}: pack ${p.digest} is listed twice (each pack once)`);
    seen.add(p.digest);
    out[i] = { digest: p.digest, size: wholeIn(p.size, 1, Number.MAX_SAFE_INTEGER, 'size', where) };
  }
  return out;
}

/** Validates one member of `bytes` decompressed bytes against `packs`. */
function decodeMember(o: Record<string, unknown>, bytes: number, packs: readonly PackRef[], where: Where): PackMember {
  const pack = wholeIn(o.pack, 0, Math.max(0, packs.length - 1), 'pack', where);
  if (packs.length === 0) throw invalidArgument(`${where}: names pack ${pack}, but "packs" is empty`);
  const packSize = packs[pack]!.size;
  const offset = wholeIn(o.offset, 0, Number.MAX_SAFE_INTEGER, 'offset', where);
  const length = wholeIn(o.length, 1, Number.MAX_SAFE_INTEGER, 'length', where);
  // Both are below 2^53 and the pack size too: compare without forming a sum that could round.
  if (offset > packSize || length > packSize - offset) {
    throw invalidArgument(`${where}: bytes ${offset}+${length} run past the end of pack ${pack} (${packs[pack]!.digest}, ${packSize} bytes)`);
  }
  let encoding: MemberEncoding = 'zstd';
  if (o.encoding !== undefined) {
    if (o.encoding !== 'raw') throw invalidArgument(`${where}: "encoding" must be "raw" or left out (zstd), not ${shown(o.encoding)} (a newer format? upgrade gear on this node)`);
    encoding = 'raw';
  }
  if (encoding === 'raw' && length !== bytes) {
    throw invalidArgument(`${where}: a raw member of ${bytes} bytes must have "length" ${bytes}, not ${length}`);
  }
  if (encoding === 'zstd' && length > maxZstdLength(bytes)) {
    throw invalidArgument(`${where}: a zstd member of ${bytes} bytes takes at most ${maxZstdLength(bytes)} bytes, not ${length}`);
  }
  return { pack, offset, length, encoding };
}

/**
 * The storage members of a v3 file entry `e` of `size` bytes: `pack`/`offset`/
 * `length`/`encoding`, or `chunkSize`/`chunks`, exactly one of the two.
 */
export function decodePackedContent(e: Record<string, unknown>, size: number, packs: readonly PackRef[], where: Where): PackedContent {
  const single = e.pack !== undefined || e.offset !== undefined || e.length !== undefined || e.encoding !== undefined;
  const chunked = e.chunkSize !== undefined || e.chunks !== undefined;
  if (e.blob !== undefined) throw invalidArgument(`${where}: version 3 stores files in packs; "blob" is a version 1/2 member`);
  if (single === chunked) {
    throw invalidArgument(`${where}: a version 3 file needs exactly one of "pack"/"offset"/"length" (one member) or "chunkSize"/"chunks" (${single ? 'both are' : 'neither is'} there)`);
  }
  if (single) {
    if (size > MAX_MEMBER_FILE_BYTES) {
      throw invalidArgument(`${where}: a file stored as one member is at most ${MAX_MEMBER_FILE_BYTES} bytes, not ${size} (bigger files are chunked)`);
    }
    return { member: decodeMember(e, size, packs, where) };
  }
  const chunkSize = wholeIn(e.chunkSize, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, 'chunkSize', where);
  const want = Math.ceil(size / chunkSize);
  if (want > MAX_CHUNKS) throw invalidArgument(`${where}: ${size} bytes in chunks of ${chunkSize} is ${want} chunks, beyond the ${MAX_CHUNKS} allowed (use bigger chunks)`);
  if (!Array.isArray(e.chunks)) throw invalidArgument(`${where}: "chunks" must be an array, not ${shown(e.chunks)}`);
  if (e.chunks.length !== want) {
    throw invalidArgument(`${where}: ${e.chunks.length} chunks do not add up to the size: ${size} bytes in chunks of ${chunkSize} is ${want} chunks`);
  }
  const chunks: FileChunk[] = new Array(want);
  for (let i = 0; i < want; i++) {
    const c = e.chunks[i] as Record<string, unknown>;
    const at = `${where}: chunks[${i}]`;
    if (!c || typeof c !== 'object' || Array.isArray(c)) throw invalidArgument(`${at}: must be an object, not ${shown(c)}`);
    if (typeof c.digest !== 'string' || !DIGEST_RE.test(c.digest)) throw invalidArgument(`${at}: "digest" must be sha256:<64 lowercase hex>, not ${shown(c.digest)}`);
    const m = decodeMember(c, Math.min(chunkSize, size - i * chunkSize), packs, at);
    chunks[i] = { ...m, digest: c.digest };
  }
  return { chunkSize, chunks };
}

/** The canonical members of a file's storage, in order, after `digest` and `size`. */
export function encodePackedContent(o: Record<string, unknown>, c: PackedContent): void {
  if (c.member) {
    o.pack = c.member.pack;
    o.offset = c.member.offset;
    o.length = c.member.length;
    if (c.member.encoding === 'raw') o.encoding = 'raw';
  } else if (c.chunks) {
    o.chunkSize = c.chunkSize;
    o.chunks = c.chunks.map((k) => {
      const e: Record<string, unknown> = { pack: k.pack, offset: k.offset, length: k.length, digest: k.digest };
      if (k.encoding === 'raw') e.encoding = 'raw';
      return e;
    });
  }
}

/** One member of the layout (a file's only member, or one of its chunks); its message text is made only for an error. */
class Placed {
  constructor(
    readonly file: number,
    /** −1: the file's only member */
    readonly chunk: number,
    readonly pack: number,
    readonly offset: number,
    readonly length: number,
    readonly encoding: MemberEncoding,
    readonly bytes: number,
    readonly digest: string,
  ) {}
}

type LaidOut = { path: string; digest: string; size: number } & PackedContent;

const fileWhere = (f: LaidOut): string => `gear index: file ${JSON.stringify(f.path.slice(0, 200))}`;

/**
 * Checks the members of every file together (docs/format.md §10.1): within a
 * pack, two ranges do not overlap unless they are identical, and identical
 * ranges hold the same bytes (encoding, byte count, digest); and a content
 * digest has one layout. `files` have passed decodePackedContent. Runs on
 * every pull's manifest before its prefetch starts: numbers only, no strings
 * made until something is wrong.
 */
export function checkPackLayout(files: readonly LaidOut[]): void {
  const placed: Placed[] = [];
  const first = new Map<string, number>();
  for (let fi = 0; fi < files.length; fi++) {
    const f = files[fi]!;
    const o = first.get(f.digest);
    if (o !== undefined) {
      const other = files[o]!;
      if (!sameLayout(other, f)) {
        throw invalidArgument(`${fileWhere(f)}: ${f.digest} is stored differently here than at ${JSON.stringify(other.path.slice(0, 200))} (one content has one layout)`);
      }
      continue; // the same members, checked once
    }
    first.set(f.digest, fi);
    const m = f.member;
    if (m) placed.push(new Placed(fi, -1, m.pack, m.offset, m.length, m.encoding, f.size, f.digest));
    else {
      const chunks = f.chunks!;
      for (let i = 0; i < chunks.length; i++) {
        const c = chunks[i]!;
        placed.push(new Placed(fi, i, c.pack, c.offset, c.length, c.encoding, chunkBytes(f, i), c.digest));
      }
    }
  }
  placed.sort((a, b) => a.pack - b.pack || a.offset - b.offset || a.length - b.length);
  const where = (p: Placed): string => `${fileWhere(files[p.file]!)}${p.chunk < 0 ? '' : ` chunks[${p.chunk}]`}`;
  for (let i = 1; i < placed.length; i++) {
    const a = placed[i - 1]!;
    const b = placed[i]!;
    if (a.pack !== b.pack || a.offset + a.length <= b.offset) continue;
    if (a.offset === b.offset && a.length === b.length) {
      if (a.encoding === b.encoding && a.bytes === b.bytes && a.digest === b.digest) continue;
      throw invalidArgument(`${where(b)}: names bytes ${b.offset}+${b.length} of pack ${b.pack}, which ${where(a)} names for other content (${a.digest}, ${a.bytes} bytes)`);
    }
    throw invalidArgument(`${where(b)}: bytes ${b.offset}+${b.length} of pack ${b.pack} overlap bytes ${a.offset}+${a.length} of ${where(a)} (members of a pack do not overlap)`);
  }
}

const sameMember = (a: PackMember, b: PackMember): boolean => a.pack === b.pack && a.offset === b.offset && a.length === b.length && a.encoding === b.encoding;

/** The same members (a file's only member, or chunk size and every chunk with its digest). */
function sameLayout(a: PackedContent, b: PackedContent): boolean {
  if (a.member || b.member) return !!a.member && !!b.member && sameMember(a.member, b.member);
  const x = a.chunks!;
  const y = b.chunks!;
  if (a.chunkSize !== b.chunkSize || x.length !== y.length) return false;
  for (let i = 0; i < x.length; i++) if (!sameMember(x[i]!, y[i]!) || x[i]!.digest !== y[i]!.digest) return false;
  return true;
}
