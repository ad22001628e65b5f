/**
 * copyGearImage: moves a Gear image *with its Gear files* between registries
 * and OCI layouts (`gear copy SRC DST`).
 *
 * `docker push`, `skopeo copy` and `crane copy` of a Gear image move its
 * manifest, config and index layer only: the Gear files are blobs that only
 * the keep-alive manifests (tags `sha256-<hex>.gear.<n>`, docs/format.md §5)
 * reference, and the index still names the old repository as the files'
 * `location`. A copy therefore:
 *
 *   1. reads the source image and its index layer (verified: digest and diff_id);
 *   2. copies each Gear blob the index names that the destination lacks: a
 *      cross-repository mount on the same registry, else a download (verified
 *      against its digest) and an upload; blobs already present are skipped;
 *   3. when the destination is a registry repository other than the index's
 *      `location`, writes a new index layer whose `location` is the
 *      destination (so nodes fetch the files from there), with a config whose
 *      diff_id follows, and a new image manifest: the image digest changes.
 *      Otherwise the index layer, config and manifest are copied byte for byte
 *      (same digest);
 *   4. pushes the keep-alive manifests and their referrers tag, then the
 *      image manifest under the destination tag, last: a destination never
 *      has a tag whose files are missing, and an interrupted copy rerun sends
 *      only what is missing.
 */
import { createHash } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { invalidArgument } from '../core/errors.js';
import { readIndexLayer } from '../core/index/index-layer.js';
import type { BlobLocation, IndexManifest } from '../core/index/manifest.js';
import { mapLimit } from './map-limit.js';
import { gearBlobs, publishGearImage, publishKeepAlive, withIndexLayer } from './publish.js';
import type { ProgressEvent } from './types.js';
import type { Destination } from './destination.js';
import { claimScratch } from './scratch.js';
import { layerTar, type SourceImage } from './source.js';

export type CopyProgress =
  | ProgressEvent
  | { kind: 'copy-plan'; blobs: number; bytes: number }
  | { kind: 'copy-blob'; digest: string; size: number; status: BlobStatus };

export type BlobStatus = 'present' | 'mounted' | 'copied';

export interface CopyOptions {
  /** Blob transfers in flight (default 4). */
  concurrency?: number;
  /** Gear files per keep-alive manifest (default 10,000). */
  filesPerManifest?: number;
  /** Where downloaded blobs wait for their upload (default: the OS temp dir). */
  tmpDir?: string;
  progress?: (e: CopyProgress) => void;
}

export interface CopySummary {
  source: string;
  destination: string;
  sourceManifestDigest: string;
  /** Digest of the image manifest written at the destination. */
  manifestDigest: string;
  /** True when a new index layer was written (its location changed); the digest then differs from the source's. */
  indexRewritten: boolean;
  /** Where the destination's index says the Gear files are (absent: it names none). */
  location?: BlobLocation;
  /** Distinct Gear blobs of the image. */
  blobs: number;
  blobsPresent: number;
  bytesPresent: number;
  blobsMounted: number;
  bytesMounted: number;
  blobsCopied: number;
  bytesCopied: number;
  keepAliveManifests: number;
  seconds: number;
}

const sameLocation = (a?: BlobLocation, b?: BlobLocation) => a?.registry === b?.registry && a?.repository === b?.repository;

/** Reads a Gear image's index from a source; refuses anything that is not a Gear image. */
async function readGearIndex(src: SourceImage) {
  if (src.layers.length !== 1) {
    throw invalidArgument(`${src.description} has ${src.layers.length} layers: not a Gear image (gear copy moves Gear images; convert it with gear convert, or copy it with skopeo/crane)`);
  }
  try {
    return await readIndexLayer(layerTar(src.layers[0]!));
  } catch (err) {
    throw invalidArgument(`${src.description}: its layer is not a Gear index (gear copy moves Gear images; copy other images with skopeo/crane): ${(err as Error).message}`, err);
  }
}

export async function copyGearImage(src: SourceImage, dst: Destination, opts: CopyOptions = {}): Promise<CopySummary> {
  const t0 = process.hrtime.bigint();
  const progress = opts.progress ?? (() => undefined);
  const blobsOf = src.blobs;
  const srcManifest = src.manifest;
  if (!blobsOf || !srcManifest) throw invalidArgument(`${src.description}: gear copy reads from a registry or an oci: layout`);
  const { manifest, entries } = await readGearIndex(src);
  // A registry destination is where nodes will find the files; an OCI layout keeps the source's location unless told one.
  const target: BlobLocation | undefined = dst.kind === 'registry' ? dst.location : (dst.location ?? manifest.location);
  const rewrite = !sameLocation(target, manifest.location);

  const scratch = await claimScratch(opts.tmpDir ?? tmpdir(), 'gear-copy-');
  const tmp = scratch.dir;
  const counts = { present: [0, 0], mounted: [0, 0], copied: [0, 0] } as Record<BlobStatus, [number, number]>;
  let seq = 0;
  /** Brings one blob of the source into dst. */
  const transfer = async (digest: string, size: number): Promise<BlobStatus> => {
    if (await dst.hasBlob(digest)) return 'present';
    if (blobsOf.repository && dst.mountBlob) {
      if (await dst.mountBlob(digest, blobsOf.repository).catch(() => false)) return 'mounted';
    }
    const local = blobsOf.localPath?.(digest);
    if (local) {
      // The destination verifies what it stores (the registry on upload, an OCI layout before its rename).
      await dst.pushFile(digest, size, local);
      return 'copied';
    }
    const file = join(tmp, `blob-${seq++}`);
    try {
      await blobsOf.fetchTo(digest, size, file);
      await dst.pushFile(digest, size, file);
    } finally {
      await rm(file, { force: true });
    }
    return 'copied';
  };
  const note = (digest: string, size: number, status: BlobStatus) => {
    counts[status][0]++;
    counts[status][1] += size;
    progress({ kind: 'copy-blob', digest, size, status });
  };

  try {
    // 2. Gear files
    const files = gearBlobs(manifest);
    progress({ kind: 'copy-plan', blobs: files.length, bytes: files.reduce((s, b) => s + b.size, 0) });
    await mapLimit(files, opts.concurrency ?? 4, async (b) => note(b.digest, b.size, await transfer(b.digest, b.size)));

    // 3-4. index, config, keep-alive manifests, the image manifest last
    let manifestDigest: string;
    let keepAlive: number;
    const filesPerManifest = opts.filesPerManifest ?? 10_000;
    if (rewrite) {
      const next: IndexManifest = { ...manifest };
      if (target) next.location = target;
      else delete next.location;
      const published = await publishGearImage(
        dst,
        next,
        entries,
        withIndexLayer(src.config),
        { tmpDir: tmp, filesPerManifest, account: () => undefined, progress },
      );
      manifestDigest = published.imageDigest;
      keepAlive = published.keepAliveManifests;
    } else {
      progress({ kind: 'phase', phase: 'index' });
      const layer = src.layers[0]!;
      if (!layer.digest || layer.size === undefined) throw invalidArgument(`${src.description}: the index layer has no digest`);
      await transfer(layer.digest, layer.size);
      await dst.pushBytes(src.configDigest, src.config);
      manifestDigest = `sha256:${createHash('sha256').update(srcManifest.bytes).digest('hex')}`;
      if (manifestDigest !== srcManifest.digest) throw invalidArgument(`${src.description}: manifest bytes do not match ${srcManifest.digest}`);
      progress({ kind: 'phase', phase: 'manifests' });
      keepAlive = await publishKeepAlive(dst, manifest, { digest: manifestDigest, size: srcManifest.bytes.length }, filesPerManifest);
      const pushed = await dst.putManifest(dst.tag, srcManifest.bytes, srcManifest.mediaType);
      if (pushed !== manifestDigest) throw invalidArgument(`destination stored the manifest as ${pushed}, expected ${manifestDigest}`);
    }
    return {
      source: src.description,
      destination: dst.description,
      sourceManifestDigest: srcManifest.digest,
      manifestDigest,
      indexRewritten: rewrite,
      ...(target ? { location: target } : {}),
      blobs: files.length,
      blobsPresent: counts.present[0],
      bytesPresent: counts.present[1],
      blobsMounted: counts.mounted[0],
      bytesMounted: counts.mounted[1],
      blobsCopied: counts.copied[0],
      bytesCopied: counts.copied[1],
      keepAliveManifests: keepAlive,
      seconds: Number(process.hrtime.bigint() - t0) / 1e9,
    };
  } finally {
    await scratch.release();
  }
}
