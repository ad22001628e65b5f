/**
 * Steps 3-5 of every conversion (and of gear prefetch and gear copy), for an
 * index whose Gear files are already in the destination: the index layer,
 * the config, the keep-alive manifests of the Gear files and their referrers
 * tag, and the image manifest, last (docs/format.md §5).
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
import { GEAR_FORMAT_VERSION, GEAR_VERSION_LABEL, GearMediaType, SOURCE_DIGEST_LABEL, type IndexManifest } from '../core/index/manifest.js';
import type { TarHeader } from '../core/index/tar.js';
import type { Destination } from './destination.js';
import type { ProgressEvent } from './types.js';
import type { PushStatus } from './upload-tally.js';

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

export interface PublishOptions {
  /** Where the index layer blob is written before upload. */
  tmpDir: string;
  filesPerManifest: number;
  account: (digest: string, size: number, status: PushStatus) => void;
  progress: (e: ProgressEvent) => void;
  /** Publish as a referrer of this manifest (ConvertOptions.attach) instead of under dst's tag. */
  attach?: { subject: { mediaType: string; digest: string; size: number } };
}

export interface Published {
  index: { diffId: string; digest: string; size: number };
  imageDigest: string;
  keepAliveManifests: number;
}

/** The head every summary of a published image starts with (convert, prefetch). */
export function publishedSummary(
  src: { description: string },
  dst: { description: string },
  published: Published,
): { source: string; destination: string; manifestDigest: string; indexDigest: string; indexDiffId: string } {
  return {
    source: src.description,
    destination: dst.description,
    manifestDigest: published.imageDigest,
    indexDigest: published.index.digest,
    indexDiffId: published.index.diffId,
  };
}

/**
 * Steps 3-5 of gear convert (every format version): publishes the converted
 * index with the source's config, and returns the head of the summary with
 * the index size and keep-alive count.
 */
export async function publishConversion(
  src: { description: string; config: Buffer; sourceDigest: string },
  dst: Destination,
  manifest: IndexManifest,
  entries: TarHeader[],
  opts: { tmpDir: string; filesPerManifest?: number | undefined; attach?: PublishOptions['attach'] | undefined; account: PublishOptions['account']; progress: PublishOptions['progress'] },
): Promise<ReturnType<typeof publishedSummary> & { indexSize: number; keepAliveManifests: number }> {
  const published = await publishGearImage(dst, manifest, entries, (diffId) => gearConfig(src.config, diffId, src.sourceDigest, manifest.version), {
    tmpDir: opts.tmpDir,
    filesPerManifest: opts.filesPerManifest ?? 10_000,
    account: opts.account,
    progress: opts.progress,
    ...(opts.attach ? { attach: opts.attach } : {}),
  });
  return { ...publishedSummary(src, dst, published), indexSize: published.index.size, keepAliveManifests: published.keepAliveManifests };
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
  account: (digest: string, size: number, status: PushStatus) => void = () => undefined,
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
