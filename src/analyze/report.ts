/**
 * The figures `gear analyze` reports (its --json output, version 1) and their
 * terminal table. Every byte count is exact; docs/analyze.md explains each.
 */
import { formatSize } from '../core/pool/size.js';

export interface ImageFigures {
  name: string;
  /** Manifest digest (registry, oci:) or config digest (docker-archive:, docker-daemon:). */
  sourceDigest: string;
  layers: number;
  /** Its layer blobs as the source stores them, and uncompressed. */
  layerBytes: { stored: number; uncompressed: number };
  /** Non-empty regular files of the flattened image (hard links once), as `gear convert` counts them. */
  files: number;
  fileBytes: number;
  /** Distinct contents among them (convert's uniqueContents). */
  distinctContents: number;
  distinctBytes: number;
  /** Files whose content another file of the same image has. */
  duplicateFiles: number;
  duplicateBytes: number;
  /** Contents no other analysed image has. */
  uniqueContents: number;
  uniqueBytes: number;
  /** What `gear convert` would upload for this image into an empty repository. */
  gear: { fileBlobs: number; fileBytes: number; indexBytes: number; configBytes: number; totalBytes: number };
  seconds: number;
}

export interface AnalyzeReport {
  version: 1;
  options: {
    storage: 'auto' | 'raw';
    rawMinBytes: number | null;
    gzipLevel: number;
    formatVersion: number;
    location: string | null;
    chunkSize: number | null;
  };
  images: ImageFigures[];
  layers: {
    /** Layers of all images, counted per image. */
    references: number;
    referencedBytes: { stored: number; uncompressed: number };
    /** Distinct layer blobs (by blob digest; by diff_id when the source names no blob digest). */
    distinct: number;
    /**
     * registry: what a registry holds for them: the blob as stored when it is
     * compressed, else (a plain tar from docker-archive:) its gzip -6 size, an
     * estimate of what a push would upload.
     */
    distinctBytes: { stored: number; uncompressed: number; registry: number };
    /** Distinct layers that two images or more hold, and their stored bytes. */
    shared: number;
    sharedStoredBytes: number;
    /** Distinct layers the sources store uncompressed (docker-archive:); a registry would hold them gzipped (distinctBytes.registry). */
    uncompressedBlobs: number;
  };
  files: {
    files: number;
    bytes: number;
    distinct: number;
    distinctBytes: number;
    /** Redundancy inside images: files minus each image's distinct contents. */
    withinImages: { files: number; bytes: number };
    /** Redundancy between images: each image's distinct contents minus the distinct contents of all. */
    acrossImages: { files: number; bytes: number };
    /** The distinct contents as Gear file blobs (gzip when worth it, as `gear convert` stores them). */
    storedBytes: number;
    gzipBlobs: number;
    rawBlobs: number;
  };
  chunks: {
    size: number;
    /** Chunks of every file (each file cut on its own), and their bytes (= files.bytes). */
    chunks: number;
    bytes: number;
    distinct: number;
    distinctBytes: number;
    /** Distinct chunks compressed with the Gear files' rule. */
    storedBytes: number;
    gzipChunks: number;
  } | null;
  /** What a registry stores for all the images together, per scheme. */
  storage: {
    /** The distinct layer blobs (layers.distinctBytes.registry) and the source configs. */
    layers: { layerBytes: number; configBytes: number; totalBytes: number };
    /** What `gear convert` of every image into one repository uploads (its bytesUploaded, summed). */
    gear: { fileBytes: number; indexBytes: number; configBytes: number; keepAliveConfigBytes: number; totalBytes: number; blobs: number };
    /** Distinct chunks plus the Gear index layers and configs (a chunk index would be larger). */
    chunks: { chunkBytes: number; indexBytes: number; configBytes: number; totalBytes: number } | null;
  };
  /** bytes[a][b]: bytes of file content (distinct, uncompressed) images a and b both hold; bytes[a][a]: a's distinct content bytes. */
  sharing: { images: string[]; bytes: number[][] };
  seconds: number;
}

/** Beyond this many images the terminal shows the top pairs instead of the matrix. */
const MATRIX_MAX_IMAGES = 8;

const pct = (part: number, whole: number) => (whole > 0 ? `${((100 * part) / whole).toFixed(1)}%` : '-');

function table(rows: string[][], rightAlign: (col: number) => boolean = (c) => c > 0): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) => r.map((c, i) => (rightAlign(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd()).join('\n');
}

/** The report as terminal text (plain, no colour). */
export function formatReport(r: AnalyzeReport): string {
  const out: string[] = [];
  const f = r.files;
  const l = r.layers;
  const s = r.storage;
  const imgs = r.images;
  out.push(`${imgs.length} image(s), ${l.references} layer(s) (${l.distinct} distinct), ${f.files} file(s) (${f.distinct} distinct contents) in ${r.seconds.toFixed(1)} s`);
  out.push('');
  out.push('Redundancy');
  const rows: string[][] = [['', 'count', 'bytes', 'of total']];
  rows.push(['layers, all', String(l.references), `${formatSize(l.referencedBytes.stored)} stored, ${formatSize(l.referencedBytes.uncompressed)} uncompressed`, '']);
  rows.push(['layers, distinct', String(l.distinct), `${formatSize(l.distinctBytes.stored)} stored, ${formatSize(l.distinctBytes.uncompressed)} uncompressed`, pct(l.distinctBytes.stored, l.referencedBytes.stored)]);
  rows.push(['layers, shared by 2+ images', String(l.shared), `${formatSize(l.sharedStoredBytes)} stored`, '']);
  rows.push(['files, all', String(f.files), formatSize(f.bytes), '']);
  rows.push(['files, duplicate within an image', String(f.withinImages.files), formatSize(f.withinImages.bytes), pct(f.withinImages.bytes, f.bytes)]);
  rows.push(['files, duplicate across images', String(f.acrossImages.files), formatSize(f.acrossImages.bytes), pct(f.acrossImages.bytes, f.bytes)]);
  rows.push(['files, distinct contents', String(f.distinct), formatSize(f.distinctBytes), pct(f.distinctBytes, f.bytes)]);
  if (r.chunks) {
    const c = r.chunks;
    rows.push([`chunks of ${formatSize(c.size)}, all`, String(c.chunks), formatSize(c.bytes), '']);
    rows.push([`chunks of ${formatSize(c.size)}, distinct`, String(c.distinct), formatSize(c.distinctBytes), pct(c.distinctBytes, c.bytes)]);
  }
  out.push(table(rows, (c) => c === 1 || c === 3));
  out.push('');
  out.push('Registry storage for all images');
  const st: string[][] = [['scheme', 'bytes', 'vs layers', 'made of']];
  st.push(['plain layers', formatSize(s.layers.totalBytes), '100%', `${l.distinct} layer blobs ${formatSize(s.layers.layerBytes)}, configs ${formatSize(s.layers.configBytes)}${l.uncompressedBlobs ? ` (${l.uncompressedBlobs} plain-tar layer(s) counted gzipped: an estimate)` : ''}`]);
  st.push([
    'Gear (gear convert)',
    formatSize(s.gear.totalBytes),
    pct(s.gear.totalBytes, s.layers.totalBytes),
    `${f.distinct} files ${formatSize(s.gear.fileBytes)} (${f.gzipBlobs} gzip, ${f.rawBlobs} raw), index layers ${formatSize(s.gear.indexBytes)}, configs ${formatSize(s.gear.configBytes + s.gear.keepAliveConfigBytes)}`,
  ]);
  if (s.chunks && r.chunks) {
    st.push(['chunks', formatSize(s.chunks.totalBytes), pct(s.chunks.totalBytes, s.layers.totalBytes), `${r.chunks.distinct} chunks ${formatSize(s.chunks.chunkBytes)}, + the Gear index layers and configs`]);
  }
  out.push(table(st, (c) => c === 1 || c === 2));
  out.push('');
  out.push('Per image');
  const pi: string[][] = [['#', 'image', 'layers', 'layer bytes', 'files', 'distinct', 'dup in image', 'unique to image', 'Gear upload alone', 's']];
  imgs.forEach((im, i) => {
    pi.push([
      String(i + 1),
      im.name,
      String(im.layers),
      formatSize(im.layerBytes.stored),
      String(im.files),
      `${im.distinctContents} (${formatSize(im.distinctBytes)})`,
      formatSize(im.duplicateBytes),
      formatSize(im.uniqueBytes),
      formatSize(im.gear.totalBytes),
      im.seconds.toFixed(1),
    ]);
  });
  out.push(table(pi, (c) => c !== 1));
  if (imgs.length > MATRIX_MAX_IMAGES) {
    out.push('');
    out.push(`Most file content shared between two images (the whole matrix: --json or --plot)`);
    const pairs: { a: number; b: number; bytes: number }[] = [];
    r.sharing.bytes.forEach((row, a) => row.forEach((bytes, b) => b > a && bytes > 0 && pairs.push({ a, b, bytes })));
    pairs.sort((x, y) => y.bytes - x.bytes);
    const m: string[][] = [['#', 'image', '#', 'image', 'shared']];
    for (const p of pairs.slice(0, 20)) m.push([String(p.a + 1), imgs[p.a]!.name, String(p.b + 1), imgs[p.b]!.name, formatSize(p.bytes)]);
    out.push(table(m, (c) => c === 0 || c === 2 || c === 4));
  } else if (imgs.length > 1) {
    out.push('');
    out.push('File content shared between images (row and column: image #; diagonal: the image\'s distinct content)');
    const m: string[][] = [['', ...imgs.map((_, i) => `#${i + 1}`)]];
    r.sharing.bytes.forEach((row, i) => m.push([`#${i + 1}`, ...row.map((b) => formatSize(b))]));
    out.push(table(m));
  }
  return `${out.join('\n')}\n`;
}
