/**
 * convertImage: source image → Gear image (docs/format.md).
 *
 * Order of work, chosen so that an interrupted run leaves the destination
 * consistent and a rerun only sends what is missing:
 *   1. flatten every layer (verified while read), staging each distinct file
 *      content on disk by digest;
 *   2. push Gear files (HEAD first, bounded concurrency);
 *   3. push the index layer, the config and the empty keep-alive config;
 *   4. push keep-alive manifests, each under its own tag (`sha256-<hex>.gear.<n>`),
 *      then the OCI referrers fallback index (`sha256-<hex>`) listing them;
 *   5. push the image manifest under its tag, last.
 */
import { createHash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { once } from 'node:events';
import { createGzip, constants as zc } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import { invalidArgument } from '../core/errors.js';
import { writeIndexLayer } from '../core/index/index-layer.js';
import { BIG_FILE_MIN_BYTES, GEAR_FORMAT_VERSION, GEAR_VERSION_LABEL, GearMediaType, SOURCE_DIGEST_LABEL, type IndexManifest, type StoredBlob } from '../core/index/manifest.js';
import type { TarHeader } from '../core/index/tar.js';
import type { Destination } from './destination.js';
import { Flattener } from './flatten.js';
import { layerTar, type SourceImage } from './source.js';
import { ContentStage } from './stage.js';
import { keepsGzip, wouldGzip } from './storage-policy.js';
import { mapLimit } from './map-limit.js';
import { claimScratch } from './scratch.js';
import { MemberPool } from './member-pool.js';
import { MemberStage, type StagedContent, type StagedMember } from './member-stage.js';
import { adoptStagedPacks, stagedPackMembers, storePacks, type StagedPack } from './packs.js';
import { bringPack, reusableMembers, type PackTransfer, type ReusableImage } from './reuse.js';
import type { PackRef } from '../core/index/manifest.js';
import { tmpdir } from 'node:os';

export const MediaTypes = {
  OciManifest: 'application/vnd.oci.image.manifest.v1+json',
  OciIndex: 'application/vnd.oci.image.index.v1+json',
  OciConfig: 'application/vnd.oci.image.config.v1+json',
  OciLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  OciEmpty: 'application/vnd.oci.empty.v1+json',
} as const;

/** The OCI empty descriptor's content `{}`. */
export const EMPTY_JSON = Buffer.from('{}');
export const EMPTY_JSON_DIGEST = 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a';


/** Registries commonly refuse manifests over 4 MiB; keep-alive manifests stay under this. */
export const MAX_REGISTRY_MANIFEST_BYTES = 4 * 1024 * 1024;

export type ProgressEvent =
  | { kind: 'layer'; index: number; count: number; name: string }
  | { kind: 'file-bytes'; bytes: number }
  | { kind: 'layer-bytes'; bytes: number }
  | { kind: 'upload-plan'; blobs: number; bytes: number }
  | { kind: 'blob'; digest: string; size: number; status: 'exists' | 'uploaded' }
  | { kind: 'pack-plan'; packs: number; bytes: number }
  | { kind: 'pack'; digest: string; size: number; status: 'exists' | 'uploaded' | 'present' | 'mounted' | 'copied' }
  | { kind: 'phase'; phase: string };

export interface ConvertOptions {
  /** Blob uploads in flight (default 4). */
  concurrency?: number;
  /** Gear files per keep-alive manifest (default 10,000; always kept under 4 MiB). */
  filesPerManifest?: number;
  /**
   * How Gear files are stored: 'auto' (default) gzips a file when that saves
   * at least 10% (docs/format.md, "Storing Gear files"); 'raw' never compresses.
   * Version 3: 'auto' stores a member as zstd when that saves 10%; 'raw' never.
   */
  storage?: 'auto' | 'raw';
  /**
   * Files of at least this many bytes are stored raw whatever `storage` says,
   * so that a driver can serve HTTP ranges of them while they download
   * (docs/format.md §4, "Big files"). Default BIG_FILE_MIN_BYTES (8 MiB);
   * Infinity gzips big files too.
   */
  rawMinBytes?: number;
  /**
   * Gear format version of the index (default GEAR_FORMAT_VERSION, 2). Version
   * 1 is for nodes running a gear that reads only version 1.
   */
  formatVersion?: 1 | 2 | 3;
  /**
   * Format version 3: Gear v3 images whose packs this conversion may reuse
   * (the image under the destination tag first, then every --dedup-with):
   * contents stored there are referenced, not stored again (reuse.ts).
   */
  reuse?: ReusableImage[];
  /** Format version 3: worker threads that hash and compress (default: the cores). */
  threads?: number;
  /** gzip level for 'auto' (default 6). */
  gzipLevel?: number;
  /** Parent of the temp staging dir (default: OS temp dir). */
  tmpDir?: string;
  progress?: (e: ProgressEvent) => void;
  /**
   * `gear convert --attach`: publish the Gear image as an OCI referrer of the
   * source image manifest `subject` (docs/format.md §9): pushed by digest,
   * listed by the referrers API or the referrers tag; no tag is written.
   */
  attach?: { subject: { mediaType: string; digest: string; size: number } };
}

export interface ConvertSummary {
  source: string;
  destination: string;
  /** Digest of the Gear image manifest. */
  manifestDigest: string;
  /** Digest of the index layer (compressed blob) and its uncompressed diff_id. */
  indexDigest: string;
  indexDiffId: string;
  /** Non-empty regular files (hard links counted once). */
  files: number;
  uniqueContents: number;
  /** Sum of the sizes of those files. */
  logicalBytes: number;
  /** Uncompressed bytes of all source layers. */
  layerBytes: number;
  bytesUploaded: number;
  bytesSkipped: number;
  blobsUploaded: number;
  blobsSkipped: number;
  /** Size of the compressed index layer. */
  indexSize: number;
  keepAliveManifests: number;
  /** Staged contents (and their gzip forms) an interrupted run of the same conversion left and this one reused. */
  resumedContents: number;
  resumedGzip: number;
  seconds: number;
  /** Format version 3: files whose content is in reused packs, and those contents' bytes (as v3.reusedFiles/Bytes). */
  reusedFiles?: number;
  reusedBytes?: number;
  /** Format version 3 (absent otherwise): packs of the index, new and reused. */
  v3?: V3Summary;
}

export interface V3Summary {
  /** Packs the index lists, and their bytes. */
  packs: number;
  packBytes: number;
  /** Packs written by this conversion (in the destination already: not uploaded again), their bytes. */
  newPacks: number;
  newPackBytes: number;
  packsUploaded: number;
  packBytesUploaded: number;
  /** Packs a killed run of the same conversion left staged and this one used. */
  packsResumed: number;
  /** Files whose content is stored in reused (older) packs, and those contents' bytes. */
  reusedFiles: number;
  reusedBytes: number;
  /** Reused packs: already in the destination, mounted from another repository, copied. */
  reusedPacks: number;
  packsPresent: number;
  packsMounted: number;
  packsCopied: number;
  /** Members compressed by this run: uncompressed and stored bytes. */
  compressedMembers: number;
  memberBytesIn: number;
  memberBytesStored: number;
  /** Images given for reuse that were skipped, and why. */
  notices: string[];
}

export { mapLimit };

function sha256(b: Buffer): string {
  return `sha256:${createHash('sha256').update(b).digest('hex')}`;
}

/** The Gear image config: the source config with rootfs, history and labels replaced. */
export function gearConfig(source: Buffer, indexDiffId: string, sourceDigest: string, version: number = GEAR_FORMAT_VERSION): Buffer {
  const cfg = JSON.parse(source.toString('utf8')) as Record<string, unknown>;
  const inner = (cfg.config && typeof cfg.config === 'object' ? cfg.config : {}) as Record<string, unknown>;
  const labels = (inner.Labels && typeof inner.Labels === 'object' ? inner.Labels : {}) as Record<string, string>;
  inner.Labels = { ...labels, [GEAR_VERSION_LABEL]: String(version), [SOURCE_DIGEST_LABEL]: sourceDigest };
  cfg.config = inner;
  cfg.rootfs = { type: 'layers', diff_ids: [indexDiffId] };
  const h: Record<string, unknown> = {};
  if (typeof cfg.created === 'string') h.created = cfg.created;
  h.created_by = 'gear convert';
  h.comment = `Gear index of ${sourceDigest}`;
  cfg.history = [h];
  return Buffer.from(JSON.stringify(cfg));
}

/** A Gear image's config with its single index layer replaced (gear prefetch, gear copy): everything else kept. */
export function withIndexLayer(gearImageConfig: Buffer): (indexDiffId: string) => Buffer {
  return (indexDiffId) => {
    const cfg = JSON.parse(gearImageConfig.toString('utf8')) as Record<string, unknown>;
    cfg.rootfs = { type: 'layers', diff_ids: [indexDiffId] };
    return Buffer.from(JSON.stringify(cfg));
  };
}

/** Keep-alive manifests: each references up to `perManifest` Gear files, never more than 4 MiB. */
export function keepAliveManifests(digests: { digest: string; size: number; mediaType: string }[], perManifest: number, subject?: { digest: string; size: number }): Buffer[] {
  const out: Buffer[] = [];
  const per = Math.max(1, Math.min(perManifest, 25_000)); // 25,000 × ≤160 bytes stays under 4 MiB
  for (let i = 0; i < digests.length; i += per) {
    const doc: Record<string, unknown> = {
      schemaVersion: 2,
      mediaType: MediaTypes.OciManifest,
      artifactType: GearMediaType.FilesManifest,
      config: { mediaType: MediaTypes.OciEmpty, digest: EMPTY_JSON_DIGEST, size: 2 },
      layers: digests.slice(i, i + per).map((d) => ({ mediaType: d.mediaType, digest: d.digest, size: d.size })),
    };
    if (subject) doc.subject = { mediaType: MediaTypes.OciManifest, digest: subject.digest, size: subject.size };
    doc.annotations = { 'io.gear.files.part': `${i / per + 1}/${Math.ceil(digests.length / per)}` };
    const b = Buffer.from(JSON.stringify(doc));
    if (b.length > MAX_REGISTRY_MANIFEST_BYTES) throw new Error(`keep-alive manifest of ${b.length} bytes exceeds 4 MiB`);
    out.push(b);
  }
  return out;
}

/** Tag that keeps an attached Gear image alive: `sha256-<hex of the source manifest>.gear`. */
export function attachedTag(sourceDigest: string): string {
  return `sha256-${sourceDigest.slice('sha256:'.length)}.gear`;
}

/** Tag of the i-th keep-alive manifest of an image: `sha256-<hex>.gear.<i+1>` (≤ 128 chars). */
export function keepAliveTag(imageDigest: string, i: number): string {
  return `sha256-${imageDigest.slice('sha256:'.length)}.gear.${i + 1}`;
}

/** Writes the index layer as tar+gzip to `file`; returns diff_id, digest, size. */
async function writeIndexBlob(manifest: IndexManifest, entries: TarHeader[], file: string) {
  const diff = createHash('sha256');
  const comp = createHash('sha256');
  let size = 0;
  // Fixed level and strategy: the same input always gives the same bytes (header mtime 0, OS 3).
  const gz = createGzip({ level: 9, strategy: zc.Z_DEFAULT_STRATEGY });
  const out = createWriteStream(file);
  gz.on('data', (c: Buffer) => {
    comp.update(c);
    size += c.length;
  });
  const done = pipeline(gz, out);
  for await (const chunk of writeIndexLayer(manifest, entries)) {
    diff.update(chunk);
    if (!gz.write(chunk)) await once(gz, 'drain');
  }
  gz.end();
  await done;
  return { diffId: `sha256:${diff.digest('hex')}`, digest: `sha256:${comp.digest('hex')}`, size };
}

export async function convertImage(src: SourceImage, dst: Destination, opts: ConvertOptions = {}): Promise<ConvertSummary> {
  const t0 = process.hrtime.bigint();
  const progress = opts.progress ?? (() => undefined);
  if ((opts.formatVersion ?? GEAR_FORMAT_VERSION) === 3) return convertV3(src, dst, opts, t0);
  // Keyed by the source: a rerun after a kill -9 takes over what the killed run staged.
  const stage = await ContentStage.create(opts.tmpDir, /^sha256:[a-f0-9]{64}$/.test(src.sourceDigest) ? src.sourceDigest.slice(7) : undefined);
  try {
    // 1. flatten
    const flat = new Flattener(stage);
    for (let i = 0; i < src.layers.length; i++) {
      const layer = src.layers[i]!;
      progress({ kind: 'layer', index: i, count: src.layers.length, name: layer.name });
      const tar = (async function* () {
        for await (const c of layerTar(layer)) {
          flat.stats.layerBytes += c.length;
          progress({ kind: 'layer-bytes', bytes: c.length });
          yield c;
        }
      })();
      await flat.applyLayer(layer.name, tar, (n) => progress({ kind: 'file-bytes', bytes: n }));
    }
    const { entries, manifest } = flat.result(dst.location);
    manifest.version = opts.formatVersion ?? GEAR_FORMAT_VERSION;

    // 2. Gear files: encode (gzip when worth it), then HEAD + upload
    const unique = new Map<string, number>();
    let logicalBytes = 0;
    for (const f of manifest.files) {
      unique.set(f.digest, f.size);
      logicalBytes += f.size;
    }
    const contents = [...unique].map(([digest, size]) => ({ digest, size })).sort((a, b) => (a.digest < b.digest ? -1 : 1));
    progress({ kind: 'upload-plan', blobs: contents.length, bytes: contents.reduce((s, b) => s + b.size, 0) });
    let bytesUploaded = 0;
    let bytesSkipped = 0;
    let blobsUploaded = 0;
    let blobsSkipped = 0;
    const account = (digest: string, size: number, status: 'exists' | 'uploaded') => {
      if (status === 'uploaded') {
        bytesUploaded += size;
        blobsUploaded++;
      } else {
        bytesSkipped += size;
        blobsSkipped++;
      }
      progress({ kind: 'blob', digest, size, status });
    };
    const stored = new Map<string, StoredBlob>();
    await mapLimit(contents, opts.concurrency ?? 4, async (c) => {
      let blob = { digest: c.digest, size: c.size, path: stage.path(c.digest), mediaType: GearMediaType.File as string };
      if (wouldGzip(c.size, { storage: opts.storage ?? 'auto', rawMinBytes: opts.rawMinBytes ?? BIG_FILE_MIN_BYTES })) {
        const gz = await stage.gzip(c.digest, opts.gzipLevel ?? 6);
        if (keepsGzip(c.size, gz.size)) {
          blob = { ...gz, mediaType: GearMediaType.FileGzip };
          stored.set(c.digest, { mediaType: GearMediaType.FileGzip, digest: gz.digest, size: gz.size });
        }
      }
      account(blob.digest, blob.size, await dst.pushFile(blob.digest, blob.size, blob.path));
    });
    for (const f of manifest.files) {
      const b = stored.get(f.digest);
      if (b) f.blob = b;
    }

    // 3-5. index layer, config, keep-alive manifests, the image manifest last
    const published = await publishGearImage(dst, manifest, entries, (diffId) => gearConfig(src.config, diffId, src.sourceDigest, manifest.version), {
      tmpDir: stage.dir,
      filesPerManifest: opts.filesPerManifest ?? 10_000,
      account,
      progress,
      ...(opts.attach ? { attach: opts.attach } : {}),
    });
    const { index, imageDigest, keepAliveManifests: keepCount } = published;

    return {
      source: src.description,
      destination: dst.description,
      manifestDigest: imageDigest,
      indexDigest: index.digest,
      indexDiffId: index.diffId,
      files: manifest.files.length,
      uniqueContents: contents.length,
      logicalBytes,
      layerBytes: flat.stats.layerBytes,
      bytesUploaded,
      bytesSkipped,
      blobsUploaded,
      blobsSkipped,
      indexSize: index.size,
      keepAliveManifests: keepCount,
      resumedContents: stage.reusedContents,
      resumedGzip: stage.reusedGzip,
      seconds: Number(process.hrtime.bigint() - t0) / 1e9,
    };
  } finally {
    await stage.close();
  }
}


export interface PublishOptions {
  /** Where the index layer blob is written before upload. */
  tmpDir: string;
  filesPerManifest: number;
  account: (digest: string, size: number, status: 'exists' | 'uploaded') => void;
  progress: (e: ProgressEvent) => void;
  /** Publish as a referrer of this manifest (ConvertOptions.attach) instead of under dst's tag. */
  attach?: { subject: { mediaType: string; digest: string; size: number } };
}

export interface Published {
  index: { diffId: string; digest: string; size: number };
  imageDigest: string;
  keepAliveManifests: number;
}

/**
 * Steps 3-5 of a conversion, for an index whose Gear files are already in
 * dst: pushes the index layer, the config (`makeConfig(diffId)`), the
 * keep-alive manifests of the files and their referrers tag, and the image
 * manifest under dst's tag, last.
 */
export async function publishGearImage(
  dst: Destination,
  manifest: IndexManifest,
  entries: TarHeader[],
  makeConfig: (indexDiffId: string) => Buffer,
  opts: PublishOptions,
): Promise<Published> {
  const { account, progress } = opts;
  progress({ kind: 'phase', phase: 'index' });
  const indexFile = join(opts.tmpDir, `index-layer-${process.pid}-${Date.now()}.tar.gz`);
  const index = await writeIndexBlob(manifest, entries, indexFile);
  try {
    if ((await stat(indexFile)).size !== index.size) throw new Error('index layer size changed while written');
    account(index.digest, index.size, await dst.pushFile(index.digest, index.size, indexFile));
  } finally {
    await rm(indexFile, { force: true });
  }
  const config = makeConfig(index.diffId);
  const configDigest = sha256(config);
  account(configDigest, config.length, await dst.pushBytes(configDigest, config));

  const doc: Record<string, unknown> = { schemaVersion: 2, mediaType: MediaTypes.OciManifest };
  if (opts.attach) doc.artifactType = GearMediaType.IndexReferrer;
  doc.config = { mediaType: MediaTypes.OciConfig, digest: configDigest, size: config.length };
  doc.layers = [{ mediaType: MediaTypes.OciLayerGzip, digest: index.digest, size: index.size }];
  if (opts.attach) {
    const s = opts.attach.subject;
    doc.subject = { mediaType: s.mediaType, digest: s.digest, size: s.size };
    doc.annotations = { [GEAR_VERSION_LABEL]: String(manifest.version) };
  }
  const imageManifest = Buffer.from(JSON.stringify(doc));
  const imageDigest = sha256(imageManifest);

  // Keep-alive manifests and the referrers tag that holds them.
  progress({ kind: 'phase', phase: 'manifests' });
  const keepCount = await publishKeepAlive(dst, manifest, { digest: imageDigest, size: imageManifest.length }, opts.filesPerManifest, account);

  // The image itself, last: under the tag, or, attached, by digest and then listed as a referrer of its subject.
  const pushed = await dst.putManifest(opts.attach ? imageDigest : dst.tag, imageManifest, MediaTypes.OciManifest);
  if (pushed !== imageDigest) throw invalidArgument(`destination stored the manifest as ${pushed}, expected ${imageDigest}`);
  if (opts.attach) {
    progress({ kind: 'phase', phase: 'referrer' });
    // Also under a tag of its own: distribution's `garbage-collect --delete-untagged` deletes untagged manifests
    // (with them the index layer) even when a tagged referrers index lists them (docs/format.md §5).
    await dst.putManifest(attachedTag(opts.attach.subject.digest), imageManifest, MediaTypes.OciManifest);
    const desc = {
      mediaType: MediaTypes.OciManifest,
      digest: imageDigest,
      size: imageManifest.length,
      artifactType: GearMediaType.IndexReferrer,
      annotations: { [GEAR_VERSION_LABEL]: String(manifest.version) },
    };
    // Registries with the referrers API index the subject themselves; the others need the tag schema.
    if (!(await dst.hasReferrersApi?.(opts.attach.subject.digest))) {
      await updateReferrersTag(dst, opts.attach.subject.digest, [desc], (m) => m.artifactType === GearMediaType.IndexReferrer);
    }
  }
  return { index, imageDigest, keepAliveManifests: keepCount };
}

/** The distinct Gear blobs an index names (blob digest, size, media type as stored; v3: its packs), sorted by blob digest. */
export function gearBlobs(manifest: IndexManifest): { digest: string; size: number; mediaType: string }[] {
  const blobs = new Map<string, { digest: string; size: number; mediaType: string }>();
  const packs = manifest.packs;
  if (manifest.version === 3 && packs) {
    // Version 3: the packs (docs/format.md §10.3), each once.
    for (const p of packs) blobs.set(p.digest, { digest: p.digest, size: p.size, mediaType: GearMediaType.Pack });
    return [...blobs.values()].sort((a, b) => (a.digest < b.digest ? -1 : a.digest > b.digest ? 1 : 0));
  }
  for (const f of manifest.files) {
    const b = f.blob ? { digest: f.blob.digest, size: f.blob.size, mediaType: GearMediaType.FileGzip as string } : { digest: f.digest, size: f.size, mediaType: GearMediaType.File as string };
    blobs.set(b.digest, b);
  }
  return [...blobs.values()].sort((a, b) => (a.digest < b.digest ? -1 : a.digest > b.digest ? 1 : 0));
}

/**
 * Pushes the keep-alive manifests of the Gear files of `manifest` for the
 * image manifest `image` (each under its tag), then the referrers fallback
 * index listing them (docs/format.md §5). The Gear files must be in dst.
 * Returns how many keep-alive manifests were pushed.
 */
export async function publishKeepAlive(
  dst: Destination,
  manifest: IndexManifest,
  image: { digest: string; size: number },
  filesPerManifest: number,
  account: (digest: string, size: number, status: 'exists' | 'uploaded') => void = () => undefined,
): Promise<number> {
  const keep = keepAliveManifests(gearBlobs(manifest), filesPerManifest, image);
  if (keep.length === 0) return 0;
  account(EMPTY_JSON_DIGEST, EMPTY_JSON.length, await dst.pushBytes(EMPTY_JSON_DIGEST, EMPTY_JSON));
  const descs: Record<string, unknown>[] = [];
  for (let i = 0; i < keep.length; i++) {
    // Each keep-alive manifest has its own tag: distribution's `garbage-collect
    // --delete-untagged` deletes untagged manifests even when a tagged index
    // references them, and with them the only reference to their Gear files.
    const m = keep[i]!;
    const d = await dst.putManifest(keepAliveTag(image.digest, i), m, MediaTypes.OciManifest);
    descs.push({ mediaType: MediaTypes.OciManifest, digest: d, size: m.length, artifactType: GearMediaType.FilesManifest });
  }
  await updateReferrersTag(dst, image.digest, descs, (m) => m.artifactType === GearMediaType.FilesManifest, 'last');
  return keep.length;
}

/**
 * The OCI referrers tag schema (`sha256-<hex of subject>`): read the image
 * index under the tag, drop the entries `replaces` matches (earlier ones of
 * ours), keep every other tool's, add `add` (first by default, so that
 * readers that take the first match find the newest), write it back.
 */
export async function updateReferrersTag(
  dst: Destination,
  subject: string,
  add: Record<string, unknown>[],
  replaces: (m: { artifactType?: string }) => boolean,
  position: 'first' | 'last' = 'first',
): Promise<void> {
  const tag = `sha256-${subject.slice('sha256:'.length)}`;
  const existing = await dst.getManifest(tag).catch(() => undefined);
  let others: unknown[] = [];
  if (existing) {
    try {
      const doc = JSON.parse(existing.bytes.toString('utf8')) as { manifests?: { artifactType?: string }[] };
      others = (Array.isArray(doc.manifests) ? doc.manifests : []).filter((m) => m && typeof m === 'object' && !replaces(m));
    } catch {
      others = [];
    }
  }
  const referrers = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaTypes.OciIndex, manifests: position === 'first' ? [...add, ...others] : [...others, ...add] }));
  await dst.putManifest(tag, referrers, MediaTypes.OciIndex);
}

/**
 * Format version 3 (docs/format.md §10.3): flatten with hashing and zstd in
 * worker threads (MemberStage), lay the new members out into packs and upload
 * them a few in flight (packs.ts), reference contents stored in packs of the
 * images given for reuse and bring those packs into the destination
 * (reuse.ts), then publish as every version does.
 */
async function convertV3(src: SourceImage, dst: Destination, opts: ConvertOptions, t0: bigint): Promise<ConvertSummary> {
  const progress = opts.progress ?? (() => undefined);
  const reuse = opts.reuse ?? [];
  const key = /^sha256:[a-f0-9]{64}$/.test(src.sourceDigest) ? src.sourceDigest.slice(7) : undefined;
  const scratch = await claimScratch(opts.tmpDir ?? tmpdir(), 'gear-convert-', key);
  let pool: MemberPool | undefined;
  try {
    const dir = scratch.dir;
    const staged: Map<string, StagedPack> = scratch.reused ? await adoptStagedPacks(dir) : new Map();
    const old = reusableMembers(reuse);
    // Reusable members: old packs first (no upload at all), then what a killed run left staged.
    const known = new Map<string, StagedMember>(old.members);
    for (const [hex, m] of stagedPackMembers(staged.values())) if (!known.has(hex)) known.set(hex, m);
    pool = await MemberPool.start({ dir, known: known.keys(), compress: opts.storage !== 'raw', ...(opts.threads ? { threads: opts.threads } : {}) });
    const stage = new MemberStage(dir, pool, known, old.contents);

    // 1. flatten; bodies hashed and compressed by the workers as they stream out of the layers
    const flat = new Flattener(stage);
    for (let i = 0; i < src.layers.length; i++) {
      const layer = src.layers[i]!;
      progress({ kind: 'layer', index: i, count: src.layers.length, name: layer.name });
      const tar = (async function* () {
        for await (const c of layerTar(layer)) {
          flat.stats.layerBytes += c.length;
          progress({ kind: 'layer-bytes', bytes: c.length });
          yield c;
        }
      })();
      await flat.applyLayer(layer.name, tar, (n) => progress({ kind: 'file-bytes', bytes: n }));
    }
    await stage.finish();
    await pool.close();
    pool = undefined;
    const { entries, manifest: m } = flat.result(dst.location);
    const manifest = m;
    manifest.version = 3;

    let bytesUploaded = 0;
    let bytesSkipped = 0;
    let blobsUploaded = 0;
    let blobsSkipped = 0;
    const account = (digest: string, size: number, status: 'exists' | 'uploaded') => {
      if (status === 'uploaded') {
        bytesUploaded += size;
        blobsUploaded++;
      } else {
        bytesSkipped += size;
        blobsSkipped++;
      }
      progress({ kind: 'blob', digest, size, status });
    };

    // 2. packs: new ones written and uploaded; reused ones referenced, indexed after the new ones in first-use order
    const oldIndex = new Map<string, number>();
    const oldList: { image: number; ref: PackRef }[] = [];
    const contents = stage.contents as Map<string, StagedContent>;
    const newBytes = [...contents.values()].reduce((s, c) => s + c.members.reduce((t, x) => t + (x.src.kind === 'local' ? x.length : 0), 0), 0);
    progress({ kind: 'pack-plan', packs: Math.ceil(newBytes / (32 * 1024 * 1024)), bytes: newBytes });
    const stats = await storePacks(manifest, contents, {
      dir,
      dst,
      concurrency: opts.concurrency ?? 4,
      staged,
      progress: (e) => {
        account(e.digest, e.size, e.status);
        progress(e);
      },
      oldPacks: {
        index: (image, pack) => {
          const ref = reuse[image]!.manifest.packs![pack]!;
          const k = ref.digest;
          let i = oldIndex.get(k);
          if (i === undefined) {
            i = oldList.length;
            oldIndex.set(k, i);
            oldList.push({ image, ref });
          }
          return i;
        },
        list: () => oldList.map((o) => o.ref),
      },
    });
    // A pack that is both new and old (the same bytes): listed once is what the format asks; it cannot
    // happen (a reused member is never written again), so only check.
    if (new Set(manifest.packs!.map((p) => p.digest)).size !== manifest.packs!.length) throw new Error('internal: a pack is listed twice');
    const transfers: Record<PackTransfer, number> = { present: 0, mounted: 0, copied: 0 };
    let n = 0;
    await mapLimit(oldList, opts.concurrency ?? 4, async (o) => {
      const t = await bringPack(dst, reuse[o.image]!, o.ref, dir, `old-pack-${n++}`);
      transfers[t]++;
      progress({ kind: 'pack', digest: o.ref.digest, size: o.ref.size, status: t });
    });
    let reusedFiles = 0;
    const reusedContents = new Map<string, number>();
    for (const f of manifest.files) {
      const c = contents.get(f.digest)!;
      if (c.members.every((x) => x.src.kind === 'old')) {
        reusedFiles++;
        reusedContents.set(f.digest, f.size);
      }
    }
    let logicalBytes = 0;
    for (const f of manifest.files) logicalBytes += f.size;

    // 3-5. index layer, config, keep-alive manifests (of the packs), the image manifest last
    const published = await publishGearImage(dst, manifest, entries, (diffId) => gearConfig(src.config, diffId, src.sourceDigest, 3), {
      tmpDir: dir,
      filesPerManifest: opts.filesPerManifest ?? 10_000,
      account,
      progress,
      ...(opts.attach ? { attach: opts.attach } : {}),
    });
    return {
      source: src.description,
      destination: dst.description,
      manifestDigest: published.imageDigest,
      indexDigest: published.index.digest,
      indexDiffId: published.index.diffId,
      files: manifest.files.length,
      uniqueContents: contents.size,
      logicalBytes,
      layerBytes: flat.stats.layerBytes,
      bytesUploaded,
      bytesSkipped,
      blobsUploaded,
      blobsSkipped,
      indexSize: published.index.size,
      keepAliveManifests: published.keepAliveManifests,
      resumedContents: 0,
      resumedGzip: 0,
      seconds: Number(process.hrtime.bigint() - t0) / 1e9,
      reusedFiles,
      reusedBytes: [...reusedContents.values()].reduce((a, b) => a + b, 0),
      v3: {
        packs: manifest.packs!.length,
        packBytes: manifest.packs!.reduce((s, p) => s + p.size, 0),
        newPacks: stats.packs,
        newPackBytes: stats.packBytes,
        packsUploaded: stats.packsUploaded,
        packBytesUploaded: stats.packBytesUploaded,
        packsResumed: stats.packsResumed,
        reusedFiles,
        reusedBytes: [...reusedContents.values()].reduce((a, b) => a + b, 0),
        reusedPacks: oldList.length,
        packsPresent: transfers.present,
        packsMounted: transfers.mounted,
        packsCopied: transfers.copied,
        compressedMembers: stage.stats.members,
        memberBytesIn: stage.stats.bytesIn,
        memberBytesStored: stage.stats.bytesStored,
        notices: [],
      },
    };
  } finally {
    await pool?.close().catch(() => undefined);
    await scratch.release();
  }
}
