/**
 * Which Gear files the node knows about, and where each one lives: the union
 * of the index manifests of the index layers in the layer store. The miss
 * filesystem only serves digests listed here (any other LOOKUP is ENOENT), so
 * a container can never make the daemon fetch arbitrary blobs.
 *
 * Where a file lives, per index layer (owner): its own blob (format v1/v2,
 * raw or gzip), or (format v3, docs/format.md §10) a member of a pack or a
 * list of chunks. A content known from a v2 and a v3 image has both; the pool
 * key is the content digest either way. The catalog also knows the order of
 * members in each pack, for read-ahead (neighbours()).
 */
import type { BlobLocation, StoredBlob } from '../index/manifest.js';
import type { FetchRequest } from '../fetcher/fetcher.js';
import type { ChunkList, MemberEncoding, MemberRef, PackLoc } from '../fetcher/pack-types.js';

/**
 * How a layer record stores a v3 file's layout (compact: thousands per record).
 * `p` indexes the record's `packs`; `e` is left out for zstd; `g` numbers the
 * directory of the file's path within the record (records written before it
 * have none: no directory read-ahead for them).
 */
export type StoredLayout =
  | { p: number; o: number; l: number; e?: 'raw'; g?: number }
  | { cs: number; c: Array<[pack: number, offset: number, length: number, digest: string, raw?: 1]> };

/**
 * One Gear file as a layer record stores it: [digest, size, blobDigest?, blobSize?] (v1/v2), or
 * [digest, size, layout] (v3; the layout's pack indexes refer to the record's `packs`).
 */
export type GearBlobTuple = [digest: string, size: number, blobDigest?: string | StoredLayout, blobSize?: number];

/** Where one owner says a content lives. */
interface Source {
  location?: BlobLocation | undefined;
  blob?: StoredBlob | undefined;
  member?: MemberRef | undefined;
  chunks?: ChunkList | undefined;
}

/**
 * A content and where its owners say it lives: the first owner inline, any
 * others in a Map (most contents have one owner: a Map each cost python3's
 * 6,606-file index ~20 ms of ApplyDiff).
 */
interface Known {
  size: number;
  owner: string | undefined;
  source: Source | undefined;
  /** owner (layer id) → where that owner's index says it is, for the owners beyond the first */
  more?: Map<string, Source>;
}

/** Every [owner, source] of a content. */
function* sourcesOf(k: Known): Generator<[string, Source]> {
  if (k.owner !== undefined) yield [k.owner, k.source!];
  if (k.more) yield* k.more;
}

/** Records owner's source of k (replacing what owner had). */
function setSource(k: Known, owner: string, src: Source): void {
  if (k.owner === undefined || k.owner === owner) {
    k.owner = owner;
    k.source = src;
  } else (k.more ??= new Map()).set(owner, src);
}

/** Drops owner's source of k; true when k has no owner left. */
function dropSource(k: Known, owner: string): boolean {
  if (k.owner === owner) {
    k.owner = undefined;
    k.source = undefined;
    const next = k.more?.entries().next();
    if (next && !next.done) {
      [k.owner, k.source] = next.value;
      k.more!.delete(k.owner);
    }
  } else k.more?.delete(owner);
  if (k.more?.size === 0) delete k.more;
  return k.owner === undefined;
}

/** A one-member file of a pack, for read-ahead. */
interface PackSlot {
  offset: number;
  length: number;
  digest: string;
  /** The directory of the file's path (StoredLayout g); -1 when unknown. */
  group: number;
}

interface Owner {
  digests: string[];
  /** pack digest → its one-member files in offset order */
  packs: Map<string, PackSlot[]>;
}

/** The v3 layout of a stored tuple, resolved against the record's packs; undefined for v1/v2 or a malformed entry. */
export function layoutOf(t: GearBlobTuple, packs: readonly PackLoc[] | undefined): { member?: MemberRef; chunks?: ChunkList } | undefined {
  const l = t[2];
  if (!l || typeof l !== 'object' || !packs) return undefined;
  const enc = (raw: unknown): MemberEncoding => (raw ? 'raw' : 'zstd');
  if ('p' in l) {
    const pack = packs[l.p];
    if (!pack) return undefined;
    return { member: { pack, offset: l.o, length: l.l, encoding: enc(l.e) } };
  }
  if ('cs' in l && Array.isArray(l.c)) {
    const size = t[1];
    const chunks = [];
    for (let i = 0; i < l.c.length; i++) {
      const [p, offset, length, digest, raw] = l.c[i]!;
      const pack = packs[p];
      if (!pack) return undefined;
      chunks.push({ pack, offset, length, digest, encoding: enc(raw), bytes: Math.min(l.cs, size - i * l.cs) });
    }
    return { chunks: { chunkSize: l.cs, chunks } };
  }
  return undefined;
}

export class BlobCatalog {
  private readonly byDigest = new Map<string, Known>();
  private readonly byOwner = new Map<string, Owner>();

  /** Registers the files of one index layer (replacing what `owner` had). `packs`: the record's packs (v3). */
  add(owner: string, location: BlobLocation | undefined, blobs: GearBlobTuple[], packs?: readonly PackLoc[]): void {
    this.remove(owner);
    const o: Owner = { digests: new Array<string>(blobs.length), packs: new Map() };
    // Slots by the record's pack index (a number), keyed by pack digest once at the end.
    const slotsOf: PackSlot[][] = [];
    for (let i = 0; i < blobs.length; i++) {
      const t = blobs[i]!;
      const [digest, size, blobDigest, blobSize] = t;
      let k = this.byDigest.get(digest);
      if (!k) {
        k = { size, owner: undefined, source: undefined };
        this.byDigest.set(digest, k);
      }
      // One shape for every source (fields set at creation, undefined when absent).
      const v3 = layoutOf(t, packs);
      const src: Source = {
        location,
        blob: !v3 && typeof blobDigest === 'string' && blobSize ? { mediaType: 'application/vnd.gear.file.v1+gzip', digest: blobDigest, size: blobSize } : undefined,
        member: v3?.member,
        chunks: v3?.member ? undefined : v3?.chunks,
      };
      if (v3?.member) {
        const { p, g } = t[2] as { p: number; g?: unknown };
        (slotsOf[p] ??= []).push({ offset: v3.member.offset, length: v3.member.length, digest, group: typeof g === 'number' && Number.isInteger(g) && g >= 0 ? g : -1 });
      }
      setSource(k, owner, src);
      o.digests[i] = digest;
    }
    for (let p = 0; p < slotsOf.length; p++) {
      const slots = slotsOf[p];
      if (!slots) continue;
      slots.sort((a, b) => a.offset - b.offset);
      o.packs.set(packs![p]!.digest, slots);
    }
    this.byOwner.set(owner, o);
  }

  /** add() of a layer's summary (layers/index-entry.ts summarize, or a GearLayerInfo). */
  addIndex(owner: string, location: BlobLocation | undefined, s: { blobs: GearBlobTuple[]; packs?: readonly PackLoc[] | undefined }): void {
    this.add(owner, location, s.blobs, s.packs);
  }

  remove(owner: string): void {
    const o = this.byOwner.get(owner);
    if (!o) return;
    this.byOwner.delete(owner);
    for (const d of o.digests) {
      const k = this.byDigest.get(d);
      if (k && dropSource(k, owner)) this.byDigest.delete(d);
    }
  }

  has(digest: string): boolean {
    return this.byDigest.has(digest);
  }

  sizeOf(digest: string): number | undefined {
    return this.byDigest.get(digest)?.size;
  }

  /** True when some index stores digest in chunks (format v3): it is streamed chunk by chunk (chunked.ts). */
  isChunked(digest: string): boolean {
    const k = this.byDigest.get(digest);
    if (k) for (const [, s] of sourcesOf(k)) if (s.chunks && s.location) return true;
    return false;
  }

  /**
   * Fetch requests for a digest, one per distinct location and layout; the
   * pack (v3) forms first (one request may serve many files), then blobs.
   */
  requests(digest: string): FetchRequest[] {
    const k = this.byDigest.get(digest);
    if (!k) return [];
    const seen = new Set<string>();
    const out: FetchRequest[] = [];
    for (const [, s] of sourcesOf(k)) {
      const loc = s.location;
      if (!loc) continue;
      const how = s.member ? `m:${s.member.pack.digest}:${s.member.offset}` : s.chunks ? `c:${s.chunks.chunks[0]?.pack.digest}:${s.chunks.chunks[0]?.offset}` : `b:${s.blob?.digest ?? ''}`;
      const key = `${loc.registry}/${loc.repository}|${how}`;
      if (seen.has(key)) continue;
      seen.add(key);
      const r: FetchRequest = { digest, size: k.size, blob: s.blob, location: loc };
      if (s.member) r.member = s.member;
      if (s.chunks) r.chunks = s.chunks;
      out.push(r);
    }
    return out.sort((a, b) => rank(a) - rank(b));
  }

  /**
   * Read-ahead (docs/lazy.md): the one-member files that follow `req`'s
   * member in its pack, in pack order, as long as their stored bytes add up to
   * at most `maxBytes` and `want` accepts them (not in the pool, not in
   * flight). Before those, with `dirBytes` > 0, the files of the member's
   * directory that lie next to it in the pack, on both sides, when that run of
   * the directory spans at most `dirBytes` stored bytes: a program loading
   * modules picks them from one directory in no particular order (a Python
   * package's __pycache__). Empty for anything but a pack member.
   */
  neighbours(req: FetchRequest, maxBytes: number, want: (digest: string, size: number) => boolean, dirBytes = 0): FetchRequest[] {
    const m = req.member;
    if (!m || maxBytes <= 0) return [];
    let slots: PackSlot[] | undefined;
    const known = this.byDigest.get(req.digest);
    for (const [owner, s] of known ? sourcesOf(known) : []) {
      if (s.member?.pack.digest === m.pack.digest && s.location?.registry === req.location.registry && s.location.repository === req.location.repository) {
        slots = this.byOwner.get(owner)?.packs.get(m.pack.digest);
        break;
      }
    }
    if (!slots) return [];
    // First slot after the member (binary search on offset).
    let lo = 0;
    let hi = slots.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (slots[mid]!.offset <= m.offset) lo = mid + 1;
      else hi = mid;
    }
    const out: FetchRequest[] = [];
    const take = (s: PackSlot): void => {
      const size = this.byDigest.get(s.digest)?.size;
      if (size === undefined || !want(s.digest, size)) return;
      out.push({ digest: s.digest, size, location: req.location, member: { pack: m.pack, offset: s.offset, length: s.length, encoding: this.encodingOf(s.digest, m.pack.digest) } });
    };
    // The member's directory run: slots[first..last] around the member (slots[lo - 1] when it is the member).
    let skipTo = lo;
    const self = slots[lo - 1];
    if (dirBytes > 0 && self && self.offset === m.offset && self.group >= 0) {
      let first = lo - 1;
      let last = lo - 1;
      while (first > 0 && slots[first - 1]!.group === self.group) first--;
      while (last < slots.length - 1 && slots[last + 1]!.group === self.group) last++;
      const span = slots[last]!.offset + slots[last]!.length - slots[first]!.offset;
      if (span <= dirBytes && last - first < MAX_READ_AHEAD_FILES) {
        for (let i = first; i <= last; i++) if (i !== lo - 1 && slots[i]!.digest !== req.digest) take(slots[i]!);
        skipTo = last + 1;
      }
    }
    // The window counts the bytes after the member, the directory's included.
    let bytes = 0;
    for (let i = lo; i < slots.length && out.length < MAX_READ_AHEAD_FILES; i++) {
      const s = slots[i]!;
      if (s.digest === req.digest) continue;
      if (bytes + s.length > maxBytes) break;
      bytes += s.length;
      if (i >= skipTo) take(s);
    }
    return out;
  }

  private encodingOf(digest: string, pack: string): MemberEncoding {
    const k = this.byDigest.get(digest);
    if (k) for (const [, s] of sourcesOf(k)) if (s.member?.pack.digest === pack) return s.member.encoding;
    return 'zstd';
  }

  get owners(): number {
    return this.byOwner.size;
  }

  get files(): number {
    return this.byDigest.size;
  }
}

/**
 * At most this many neighbours per miss, whatever the byte window: an index
 * of tiny members (a hostile one: 1-byte raw members) must not turn one miss
 * into a million queued jobs.
 */
export const MAX_READ_AHEAD_FILES = 256;

function rank(r: FetchRequest): number {
  return r.member ? 0 : r.chunks ? 1 : 2;
}
