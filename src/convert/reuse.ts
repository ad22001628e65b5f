/**
 * Reuse of packs across Gear v3 images (docs/format.md §10.3, `--dedup-with`):
 * contents already stored in packs of an image the converter is told about —
 * the image currently under the destination tag, and every `--dedup-with REF`
 * — are not stored again. Their entries name the old ranges; the old packs
 * are listed in the new index and brought into the destination repository: a
 * cross-repository mount on the same registry (no bytes sent), else a copy
 * (downloaded, verified, uploaded). A v1/v2 image is not reusable and is
 * skipped with a notice.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { readIndexLayer } from '../core/index/index-layer.js';
import type { BlobLocation } from '../core/index/manifest.js';
import type { Destination } from './destination.js';
import type { StagedContent, StagedMember } from './member-stage.js';
import { layerTar, type BlobReader, type SourceImage } from './source.js';
import { chunkBytes, type IndexManifest, type PackRef } from '../core/index/manifest.js';

export interface ReusableImage {
  description: string;
  /** Where its packs are (the index's location). */
  location?: BlobLocation;
  manifest: IndexManifest;
  /** Blob access to the repository the image was read from (for copies). */
  blobs?: BlobReader;
}

/**
 * The Gear v3 index of `src`, or why it cannot be reused (not a Gear image,
 * an older format version): the caller prints the reason as a notice.
 */
export async function readReusable(src: SourceImage): Promise<ReusableImage | { skipped: string }> {
  if (src.layers.length !== 1) return { skipped: `${src.description} is not a Gear image (${src.layers.length} layers); not used for dedup` };
  let manifest: IndexManifest;
  try {
    manifest = (await readIndexLayer(layerTar(src.layers[0]!))).manifest as IndexManifest;
  } catch (err) {
    return { skipped: `${src.description} is not a Gear image (${(err as Error).message.slice(0, 200)}); not used for dedup` };
  }
  if (manifest.version !== 3) {
    return { skipped: `${src.description} is a Gear format version ${manifest.version} image; only version 3 packs are reused` };
  }
  const out: ReusableImage = { description: src.description, manifest };
  if (manifest.location) out.location = manifest.location;
  if (src.blobs) out.blobs = src.blobs;
  return out;
}

/**
 * The members and contents of reusable images, by hex / digest (the first
 * image that stores one wins: the destination's own image comes first).
 */
export function reusableMembers(images: readonly ReusableImage[]): { members: Map<string, StagedMember>; contents: Map<string, StagedContent> } {
  const members = new Map<string, StagedMember>();
  const contents = new Map<string, StagedContent>();
  images.forEach((img, image) => {
    for (const f of img.manifest.files) {
      if (contents.has(f.digest)) continue;
      let c: StagedContent | undefined;
      if (f.member) {
        const m = f.member;
        const sm: StagedMember = { hex: f.digest.slice(7), size: f.size, length: m.length, encoding: m.encoding ?? 'zstd', src: { kind: 'old', image, pack: m.pack, offset: m.offset } };
        c = { digest: f.digest, size: f.size, members: [sm] };
      } else if (f.chunks && f.chunkSize) {
        c = {
          digest: f.digest,
          size: f.size,
          chunkSize: f.chunkSize,
          members: f.chunks.map((ch, i) => ({ hex: ch.digest.slice(7), size: chunkBytes(f, i), length: ch.length, encoding: ch.encoding ?? 'zstd', src: { kind: 'old', image, pack: ch.pack, offset: ch.offset } })),
        };
      }
      if (!c) continue;
      contents.set(f.digest, c);
      for (const m of c.members) if (!members.has(m.hex)) members.set(m.hex, m);
    }
  });
  return { members, contents };
}

export type PackTransfer = 'present' | 'mounted' | 'copied';

/**
 * Brings pack `p` of `img` into dst: present already, mounted from the
 * repository it is stored in (same registry), or copied (verified).
 */
export async function bringPack(dst: Destination, img: ReusableImage, p: PackRef, tmpDir: string, name: string): Promise<PackTransfer> {
  if (await dst.hasBlob(p.digest)) return 'present';
  if (dst.mountBlob) {
    for (const from of [img.location, img.blobs?.repository]) {
      if (from && (await dst.mountBlob(p.digest, from).catch(() => false))) return 'mounted';
    }
  }
  if (!img.blobs) throw new Error(`${img.description}: pack ${p.digest} cannot be read from here (no blob access) and the destination lacks it`);
  const local = img.blobs.localPath?.(p.digest);
  if (local) {
    await dst.pushFile(p.digest, p.size, local);
    return 'copied';
  }
  const file = join(tmpDir, name);
  try {
    await img.blobs.fetchTo(p.digest, p.size, file);
    await dst.pushFile(p.digest, p.size, file);
  } finally {
    await rm(file, { force: true });
  }
  return 'copied';
}
