/**
 * analyzeImages: how much of a set of images is redundant, and what a registry
 * would store for them as plain layers, as Gear files (what `gear convert`
 * uploads) and, optionally, as fixed-size chunks (docs/analyze.md).
 *
 * Each image is read the way `gear convert` reads it (src/convert/source.ts:
 * every blob verified against its digest and diff_id; the converter's
 * flattener and tar reader with their limits: every entry is hostile), with a
 * ContentMeter in place of the converter's staging directory: contents are
 * hashed and their stored size measured while they stream, never held whole
 * in memory nor written to disk. Images are read one after the other; what
 * stays across images is one compact record per distinct content
 * (ContentTable), per distinct chunk (ChunkTable) and per distinct layer.
 */
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { constants as zc, createGzip, type Gzip, type ZlibOptions } from 'node:zlib';
import { gearConfig } from '../convert/publish.js';
import { Flattener } from '../convert/flatten.js';
import { layerTar, type SourceImage, type SourceLayer } from '../convert/source.js';
import { writeIndexLayer } from '../core/index/index-layer.js';
import { BIG_FILE_MIN_BYTES, GearMediaType, type BlobLocation, type IndexManifest } from '../core/index/manifest.js';
import type { TarHeader } from '../core/index/tar.js';
import { ChunkTable } from './chunk-table.js';
import { ContentMeter, type StoragePolicy } from './content-meter.js';
import { ContentTable, digestKey } from './content-table.js';
import type { AnalyzeReport, ImageFigures } from './report.js';

export interface ImageInput {
  /** As given on the command line; names the image in the report. */
  name: string;
  open(): Promise<SourceImage>;
}

export type AnalyzeProgress =
  | { kind: 'image'; index: number; count: number; name: string }
  | { kind: 'layer'; index: number; count: number }
  | { kind: 'bytes'; bytes: number };

export interface AnalyzeOptions {
  /** How `gear convert` would store Gear files (its --storage, --raw-above; gzip level 6). */
  storage?: 'auto' | 'raw';
  rawMinBytes?: number;
  gzipLevel?: number;
  /** Fixed chunk size for the chunk-level figures; undefined: no chunk figures. */
  chunkSize?: number;
  /** Index format version the prediction assumes (convert's --format-version, default 2). */
  formatVersion?: 1 | 2;
  /** Where the Gear files would live (written into each index; a registry destination's registry/repository). */
  location?: BlobLocation;
  progress?: (e: AnalyzeProgress) => void;
}

interface LayerRecord {
  /** Bytes of the blob as the source stores it. */
  stored: number;
  uncompressed: number;
  /** False when the source stores the layer as a plain tar (docker-archive). */
  compressed: boolean;
  /** What a registry holds for it: `stored` when compressed, else the gzip -6 of the tar (what a push would make of it, estimated). */
  registry: number;
  /** Images holding it (ascending, each once). */
  images: number[];
}

/** The gzip settings of the converter's index layer (src/convert/convert.ts writeIndexBlob). */
const INDEX_GZIP = { level: 9, strategy: zc.Z_DEFAULT_STRATEGY };

/** Streams bytes through gzip, keeping only the size and sha256 of the output. */
export class GzipCounter {
  private readonly gz: Gzip;
  private readonly hash = createHash('sha256');
  private readonly ended: Promise<unknown>;
  size = 0;

  constructor(opts: ZlibOptions) {
    this.gz = createGzip(opts);
    this.gz.on('data', (c: Buffer) => {
      this.hash.update(c);
      this.size += c.length;
    });
    this.ended = once(this.gz, 'end');
    this.ended.catch(() => undefined);
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (!this.gz.write(chunk)) await once(this.gz, 'drain');
  }

  async end(): Promise<{ size: number; digest: string }> {
    this.gz.end();
    await this.ended;
    return { size: this.size, digest: `sha256:${this.hash.digest('hex')}` };
  }

  destroy(): void {
    this.gz.destroy();
  }
}

/** Size, digest and diff_id of the index layer `gear convert` would write for this tree. */
export async function measureIndexLayer(manifest: IndexManifest, entries: TarHeader[]): Promise<{ diffId: string; digest: string; size: number }> {
  const diff = createHash('sha256');
  const gz = new GzipCounter(INDEX_GZIP);
  try {
    for await (const chunk of writeIndexLayer(manifest, entries)) {
      diff.update(chunk);
      await gz.write(chunk);
    }
    const out = await gz.end();
    return { diffId: `sha256:${diff.digest('hex')}`, ...out };
  } catch (err) {
    gz.destroy();
    throw err;
  }
}

/** gzip or zstd magic at the start of a blob. */
function isCompressed(head: Uint8Array): boolean {
  return (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) || (head.length >= 4 && head[0] === 0x28 && head[1] === 0xb5 && head[2] === 0x2f && head[3] === 0xfd);
}

/** The error, its message prefixed with the image's name unless it already starts with it. */
function naming(name: string, err: unknown): Error {
  const msg = err instanceof Error ? err.message : String(err);
  return new Error(msg.startsWith(name) ? msg : `${name}: ${msg}`, { cause: err });
}

function counting(src: AsyncIterable<Uint8Array>, onBytes: (n: number) => void): AsyncIterable<Uint8Array> {
  return (async function* () {
    for await (const c of src) {
      onBytes(c.length);
      yield c;
    }
  })();
}

export async function analyzeImages(inputs: ImageInput[], opts: AnalyzeOptions = {}): Promise<AnalyzeReport> {
  const t0 = process.hrtime.bigint();
  const progress = opts.progress ?? (() => undefined);
  const policy: StoragePolicy = {
    storage: opts.storage ?? 'auto',
    rawMinBytes: opts.rawMinBytes ?? BIG_FILE_MIN_BYTES,
    gzipLevel: opts.gzipLevel ?? 6,
  };
  // Versions 1 and 2 (one blob per file) are what this model predicts; version 3's packs are not modelled yet.
  const formatVersion = opts.formatVersion ?? 2;
  const table = new ContentTable();
  const chunks = opts.chunkSize !== undefined ? new ChunkTable(opts.chunkSize) : undefined;
  const meter = new ContentMeter(table, policy, chunks);
  const layers = new Map<string, LayerRecord>();
  const indexBlobs = new Map<string, number>();
  const configBlobs = new Map<string, number>();
  const sourceConfigs = new Map<string, number>();
  const images: ImageFigures[] = [];
  let layerRefs = 0;
  let layerRefStored = 0;
  let layerRefUncompressed = 0;
  let chunkOccurrences = 0;

  for (let k = 0; k < inputs.length; k++) {
    const input = inputs[k]!;
    progress({ kind: 'image', index: k, count: inputs.length, name: input.name });
    const tImage = process.hrtime.bigint();
    let src: SourceImage;
    try {
      src = await input.open();
    } catch (err) {
      throw naming(input.name, err);
    }
    try {
      const flat = new Flattener(meter);
      const fig: ImageFigures = {
        name: input.name,
        sourceDigest: src.sourceDigest,
        layers: src.layers.length,
        layerBytes: { stored: 0, uncompressed: 0 },
        files: 0,
        fileBytes: 0,
        distinctContents: 0,
        distinctBytes: 0,
        duplicateFiles: 0,
        duplicateBytes: 0,
        uniqueContents: 0,
        uniqueBytes: 0,
        gear: { fileBlobs: 0, fileBytes: 0, indexBytes: 0, configBytes: 0, totalBytes: 0 },
        seconds: 0,
      };
      sourceConfigs.set(src.configDigest, src.config.length);
      for (let i = 0; i < src.layers.length; i++) {
        const layer = src.layers[i]!;
        progress({ kind: 'layer', index: i, count: src.layers.length });
        const key = layer.digest ?? layer.diffId;
        const known = layers.get(key);
        meter.knownLayer = known !== undefined;
        let rawBytes = 0;
        let tarBytes = 0;
        // A plain-tar blob (docker-archive): gzip it on the side to estimate what a registry would hold.
        let plain: GzipCounter | undefined;
        let compressed: boolean | undefined;
        const counted: SourceLayer = {
          ...layer,
          open: async () =>
            (async function* () {
              for await (const c of await layer.open()) {
                if (compressed === undefined) {
                  compressed = isCompressed(c);
                  if (!compressed && !known) plain = new GzipCounter({ level: 6 });
                }
                rawBytes += c.length;
                progress({ kind: 'bytes', bytes: c.length });
                await plain?.write(c);
                yield c;
              }
            })(),
        };
        const tar = counting(layerTar(counted), (n) => (tarBytes += n)) as AsyncIterable<Buffer>;
        let registryBytes = rawBytes;
        try {
          await flat.applyLayer(layer.name, tar);
          if (plain) registryBytes = (await plain.end()).size;
        } finally {
          meter.knownLayer = false;
          plain?.destroy();
        }
        if (known) {
          if (known.images[known.images.length - 1] !== k) known.images.push(k);
        } else {
          const isGz = compressed ?? false;
          layers.set(key, { stored: rawBytes, uncompressed: tarBytes, compressed: isGz, registry: isGz ? rawBytes : registryBytes, images: [k] });
        }
        layerRefs++;
        layerRefStored += rawBytes;
        layerRefUncompressed += tarBytes;
        fig.layerBytes.stored += rawBytes;
        fig.layerBytes.uncompressed += tarBytes;
      }
      await meter.settle();

      // The image as `gear convert` would write it: its files, its index layer, its config.
      const { entries, manifest } = flat.result(opts.location);
      manifest.version = formatVersion;
      for (const f of manifest.files) {
        const key = digestKey(f.digest);
        const l = table.list(key, k);
        fig.files++;
        fig.fileBytes += f.size;
        if (chunks) chunkOccurrences += chunks.chunksOf(f.size);
        if (l.first) {
          fig.distinctContents++;
          fig.distinctBytes += l.size;
          fig.gear.fileBlobs++;
          fig.gear.fileBytes += l.stored;
        } else {
          fig.duplicateFiles++;
          fig.duplicateBytes += f.size;
        }
        if (l.newGlobally && chunks) chunks.countContent(key, l.size);
        const gz = table.gzipBlob(key);
        if (gz) f.blob = { mediaType: GearMediaType.FileGzip, digest: gz.digest, size: gz.size };
      }
      const index = await measureIndexLayer(manifest, entries);
      const config = gearConfig(src.config, index.diffId, src.sourceDigest, manifest.version);
      const configDigest = `sha256:${createHash('sha256').update(config).digest('hex')}`;
      indexBlobs.set(index.digest, index.size);
      configBlobs.set(configDigest, config.length);
      fig.gear.indexBytes = index.size;
      fig.gear.configBytes = config.length;
      // + the keep-alive manifests' empty config `{}` when the image has Gear files (docs/format.md §5).
      fig.gear.totalBytes = fig.gear.fileBytes + index.size + config.length + (fig.gear.fileBlobs > 0 ? 2 : 0);
      fig.seconds = Number(process.hrtime.bigint() - tImage) / 1e9;
      images.push(fig);
    } catch (err) {
      throw naming(input.name, err);
    } finally {
      await src.close();
    }
  }

  // Contents listed by one image only.
  for (const s of table.singles()) {
    images[s.image]!.uniqueContents++;
    images[s.image]!.uniqueBytes += s.size;
  }

  // Pairwise sharing: contents in 2+ images, grouped by their image set so each set's pairs are added once.
  const n = images.length;
  const sharing: number[][] = Array.from({ length: n }, (_, i) => Array.from({ length: n }, (_, j) => (i === j ? images[i]!.distinctBytes : 0)));
  const bySet = new Map<string, number>();
  let acrossFiles = 0;
  for (const [id, imgs] of table.shared) {
    const k = imgs.join(',');
    bySet.set(k, (bySet.get(k) ?? 0) + table.sizeOf(id));
    acrossFiles += imgs.length - 1;
  }
  for (const [k, bytes] of bySet) {
    const imgs = k.split(',').map(Number);
    for (let a = 0; a < imgs.length; a++) {
      for (let b = a + 1; b < imgs.length; b++) {
        sharing[imgs[a]!]![imgs[b]!]! += bytes;
        sharing[imgs[b]!]![imgs[a]!]! += bytes;
      }
    }
  }

  // Layers.
  let distinctStored = 0;
  let distinctRegistry = 0;
  let distinctUncompressed = 0;
  let sharedLayers = 0;
  let sharedStored = 0;
  let uncompressedLayers = 0;
  for (const l of layers.values()) {
    distinctStored += l.stored;
    distinctRegistry += l.registry;
    distinctUncompressed += l.uncompressed;
    if (!l.compressed) uncompressedLayers++;
    if (l.images.length > 1) {
      sharedLayers++;
      sharedStored += l.stored;
    }
  }

  const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
  const files = images.reduce((a, f) => a + f.files, 0);
  const fileBytes = images.reduce((a, f) => a + f.fileBytes, 0);
  const perImageDistinct = images.reduce((a, f) => a + f.distinctContents, 0);
  const perImageDistinctBytes = images.reduce((a, f) => a + f.distinctBytes, 0);
  const indexBytes = sum(indexBlobs);
  const configBytes = sum(configBlobs);
  const keepAliveConfig = table.listedContents > 0 ? 2 : 0;

  return {
    version: 1,
    options: {
      storage: policy.storage,
      rawMinBytes: Number.isFinite(policy.rawMinBytes) ? policy.rawMinBytes : null,
      gzipLevel: policy.gzipLevel,
      formatVersion,
      location: opts.location ? `${opts.location.registry}/${opts.location.repository}` : null,
      chunkSize: chunks?.size ?? null,
    },
    images,
    layers: {
      references: layerRefs,
      referencedBytes: { stored: layerRefStored, uncompressed: layerRefUncompressed },
      distinct: layers.size,
      distinctBytes: { stored: distinctStored, uncompressed: distinctUncompressed, registry: distinctRegistry },
      shared: sharedLayers,
      sharedStoredBytes: sharedStored,
      uncompressedBlobs: uncompressedLayers,
    },
    files: {
      files,
      bytes: fileBytes,
      distinct: table.listedContents,
      distinctBytes: table.listedBytes,
      withinImages: { files: files - perImageDistinct, bytes: fileBytes - perImageDistinctBytes },
      acrossImages: { files: acrossFiles, bytes: perImageDistinctBytes - table.listedBytes },
      storedBytes: table.listedStoredBytes,
      gzipBlobs: table.gzipBlobs,
      rawBlobs: table.listedContents - table.gzipBlobs,
    },
    chunks: chunks
      ? {
          size: chunks.size,
          chunks: chunkOccurrences,
          bytes: fileBytes,
          distinct: chunks.distinct,
          distinctBytes: chunks.distinctBytes,
          storedBytes: chunks.storedBytes,
          gzipChunks: chunks.gzipChunks,
        }
      : null,
    storage: {
      layers: { layerBytes: distinctRegistry, configBytes: sum(sourceConfigs), totalBytes: distinctRegistry + sum(sourceConfigs) },
      gear: {
        fileBytes: table.listedStoredBytes,
        indexBytes,
        configBytes,
        keepAliveConfigBytes: keepAliveConfig,
        totalBytes: table.listedStoredBytes + indexBytes + configBytes + keepAliveConfig,
        blobs: table.listedContents + indexBlobs.size + configBlobs.size + (keepAliveConfig ? 1 : 0),
      },
      chunks: chunks ? { chunkBytes: chunks.storedBytes, indexBytes, configBytes, totalBytes: chunks.storedBytes + indexBytes + configBytes } : null,
    },
    sharing: { images: images.map((i) => i.name), bytes: sharing },
    seconds: Number(process.hrtime.bigint() - t0) / 1e9,
  };
}
