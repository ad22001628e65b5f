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
 * Steps 3-5 are publish.ts; format version 3 (packs) is convert-v3.ts.
 */
import { BIG_FILE_MIN_BYTES, GEAR_FORMAT_VERSION, GearMediaType, type StoredBlob } from '../core/index/manifest.js';
import { convertV3 } from './convert-v3.js';
import type { Destination } from './destination.js';
import { flattenLayers, Flattener } from './flatten.js';
import { mapLimit } from './map-limit.js';
import { publishConversion } from './publish.js';
import type { SourceImage } from './source.js';
import { ContentStage } from './stage.js';
import { keepsGzip, wouldGzip } from './storage-policy.js';
import type { ConvertOptions, ConvertSummary } from './types.js';
import { UploadTally } from './upload-tally.js';

export type { ConvertOptions, ConvertSummary, ProgressEvent, V3Summary } from './types.js';

export async function convertImage(src: SourceImage, dst: Destination, opts: ConvertOptions = {}): Promise<ConvertSummary> {
  const t0 = process.hrtime.bigint();
  const progress = opts.progress ?? (() => undefined);
  if ((opts.formatVersion ?? GEAR_FORMAT_VERSION) === 3) return convertV3(src, dst, opts, t0);
  // Keyed by the source: a rerun after a kill -9 takes over what the killed run staged.
  const stage = await ContentStage.create(opts.tmpDir, /^sha256:[a-f0-9]{64}$/.test(src.sourceDigest) ? src.sourceDigest.slice(7) : undefined);
  try {
    // 1. flatten
    const flat = new Flattener(stage);
    await flattenLayers(flat, src.layers, progress);
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
    const tally = new UploadTally(progress);
    const account = tally.account;
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
    const published = await publishConversion(src, dst, manifest, entries, { tmpDir: stage.dir, filesPerManifest: opts.filesPerManifest, attach: opts.attach, account, progress });
    return {
      ...published,
      files: manifest.files.length,
      uniqueContents: contents.length,
      logicalBytes,
      layerBytes: flat.stats.layerBytes,
      ...tally.totals(),
      resumedContents: stage.reusedContents,
      resumedGzip: stage.reusedGzip,
      seconds: Number(process.hrtime.bigint() - t0) / 1e9,
    };
  } finally {
    await stage.close();
  }
}
