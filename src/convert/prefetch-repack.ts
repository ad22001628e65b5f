/**
 * `gear prefetch` on a format version 3 image: the listed files are packed
 * again, in list order, into new pack(s) that come first in `packs`, so that
 * a node's prefetch reads a few contiguous ranges instead of one range per
 * file scattered over the image's packs. Their stored bytes are read from the
 * existing packs (HTTP Range requests), checked (decompressed and hashed
 * against the content or chunk digest) and copied as they are (no second
 * compression). Every other file keeps its range; packs no file uses any
 * more are dropped from the index.
 */
import { createHash } from 'node:crypto';
import { invalidArgument } from '../core/errors.js';
import { chunkBytes, type FileChunk, type IndexManifest, type PackMember, type PackRef } from '../core/index/manifest.js';
import { zstdDecompress } from '../core/sys/zstd.js';
import type { Destination } from './destination.js';
import { mapLimit } from './map-limit.js';
import { layoutPacks, PACK_MAX_BYTES } from './pack-plan.js';
import { bringPack, type ReusableImage } from './reuse.js';
import type { BlobReader } from './source.js';

export interface RepackStats {
  /** New packs written (the listed files), their bytes, and how many of them were uploaded. */
  packs: number;
  packBytes: number;
  packsUploaded: number;
  /** Members moved into the new packs. */
  members: number;
}

interface Moved {
  /** Where the bytes are now (old pack index of `manifest.packs`). */
  from: PackMember;
  /** sha256 hex of the decompressed bytes, and their count. */
  hex: string;
  size: number;
  length: number;
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/**
 * Rewrites `manifest` (version 3) so that the contents of `list` are in new
 * packs at the front, pushing those packs into dst (and every still-used old
 * pack, mounted or copied when dst is another repository). Returns what it did.
 */
export async function repackPrefetch(
  manifest: IndexManifest,
  list: readonly string[],
  source: { description: string; blobs?: BlobReader },
  dst: Destination,
  opts: { tmpDir: string; concurrency?: number; maxPackBytes?: number; progress?: (e: { kind: 'pack'; digest: string; size: number; status: string }) => void },
): Promise<RepackStats> {
  const readRange = source.blobs?.readRange;
  if (!readRange) throw invalidArgument(`${source.description}: gear prefetch re-packs a version 3 image from a registry or an oci: layout`);
  const oldPacks = manifest.packs ?? [];
  const byPath = new Map(manifest.files.map((f) => [f.path, f]));
  // The listed contents in list order, each once, with their members in order.
  const order: { digest: string; members: Moved[] }[] = [];
  const listed = new Set<string>();
  for (const p of list) {
    const f = byPath.get(p);
    if (!f || listed.has(f.digest)) continue;
    listed.add(f.digest);
    const members: Moved[] = f.member
      ? [{ from: f.member, hex: f.digest.slice(7), size: f.size, length: f.member.length }]
      : (f.chunks ?? []).map((c, i) => ({ from: c, hex: c.digest.slice(7), size: chunkBytes(f, i), length: c.length }));
    order.push({ digest: f.digest, members });
  }
  const plan = layoutPacks(order, opts.maxPackBytes ?? PACK_MAX_BYTES);
  const where = new Map<Moved, { pack: number; offset: number }>();
  plan.forEach((p, i) => p.members.forEach(({ member, offset }) => where.set(member, { pack: i, offset })));

  // Write the new packs: each member's stored bytes read from its old pack and checked before they are used.
  const refs: PackRef[] = new Array(plan.length);
  let uploaded = 0;
  await mapLimit(
    plan.map((p, i) => ({ p, i })),
    opts.concurrency ?? 4,
    async ({ p, i }) => {
      const buf = Buffer.allocUnsafeSlow(p.size);
      for (const { member: m, offset } of p.members) {
        const old = oldPacks[m.from.pack]!;
        const stored = await readRange.call(source.blobs, old.digest, old.size, m.from.offset, m.from.length);
        const bytes = (m.from.encoding ?? 'zstd') === 'raw' ? stored : zstdDecompress(stored, m.size);
        if (bytes.length !== m.size || sha(bytes) !== m.hex) {
          throw invalidArgument(`${source.description}: bytes ${m.from.offset}+${m.from.length} of pack ${old.digest} do not match sha256:${m.hex}; the image is damaged`);
        }
        stored.copy(buf, offset);
      }
      const digest = `sha256:${sha(buf)}`;
      const status = await dst.pushBytes(digest, buf);
      if (status === 'uploaded') uploaded++;
      opts.progress?.({ kind: 'pack', digest, size: buf.length, status });
      refs[i] = { digest, size: buf.length };
    },
  );

  // Old packs still used by other files keep their ranges, indexed after the new ones in order of first use.
  const kept = new Map<number, number>();
  const keptRefs: PackRef[] = [];
  const oldIndex = (i: number) => {
    let k = kept.get(i);
    if (k === undefined) {
      k = keptRefs.length;
      kept.set(i, k);
      keptRefs.push(oldPacks[i]!);
    }
    return refs.length + k;
  };
  const movedOf = new Map(order.map((o) => [o.digest, o.members]));
  for (const f of manifest.files) {
    const moved = movedOf.get(f.digest);
    if (moved) {
      const place = (m: Moved): PackMember => ({ pack: where.get(m)!.pack, offset: where.get(m)!.offset, length: m.length, encoding: m.from.encoding ?? 'zstd' });
      if (f.member) f.member = place(moved[0]!);
      else f.chunks = moved.map((m, i): FileChunk => ({ ...place(m), digest: f.chunks![i]!.digest }));
    } else if (f.member) f.member = { ...f.member, pack: oldIndex(f.member.pack) };
    else if (f.chunks) f.chunks = f.chunks.map((c) => ({ ...c, pack: oldIndex(c.pack) }));
  }
  manifest.packs = [...refs, ...keptRefs];

  // dst may be another repository: the kept packs must be there too.
  const img: ReusableImage = { description: source.description, manifest, ...(manifest.location ? { location: manifest.location } : {}), ...(source.blobs ? { blobs: source.blobs } : {}) };
  let n = 0;
  await mapLimit(keptRefs, opts.concurrency ?? 4, async (p) => {
    const t = await bringPack(dst, img, p, opts.tmpDir, `kept-pack-${n++}`);
    opts.progress?.({ kind: 'pack', digest: p.digest, size: p.size, status: t });
  });
  return { packs: refs.length, packBytes: refs.reduce((s, r) => s + r.size, 0), packsUploaded: uploaded, members: where.size };
}
