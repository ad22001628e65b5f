/**
 * How `gear convert` stores one Gear file: gzipped when that makes the blob at most GZIP_WORTH_IT of the
 * content, raw otherwise, and always raw from rawMinBytes up (streamed files, read by range). `gear analyze`
 * predicts uploads with the same rule, so the two cannot drift apart.
 */

/** A Gear file is stored gzipped when that makes it at most this fraction of its size. */
export const GZIP_WORTH_IT = 0.9;

export interface StoragePolicy {
  /** 'auto': gzip when the blob is at most 90% of the content; 'raw': never. */
  storage: 'auto' | 'raw';
  /** Contents of at least this size are stored raw (convert's --raw-above; Infinity: never). */
  rawMinBytes: number;
  /** gzip level (convert: 6). */
  gzipLevel: number;
}

/** Whether `gear convert` tries gzip for a content of this size. */
export function wouldGzip(size: number, p: Pick<StoragePolicy, 'storage' | 'rawMinBytes'>): boolean {
  return p.storage === 'auto' && size < p.rawMinBytes;
}

/** Whether a content of `size` bytes is kept gzipped when its gzip form is `gzipSize` bytes. */
export function keepsGzip(size: number, gzipSize: number): boolean {
  return gzipSize <= size * GZIP_WORTH_IT;
}
