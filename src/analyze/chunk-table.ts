/**
 * ChunkTable: fixed-size chunk deduplication for `gear analyze --chunks SIZE`.
 *
 * Each distinct file content is cut into chunks of SIZE bytes (the last one
 * shorter) and each chunk is keyed by its sha256 (the first 16 bytes, as a
 * one-byte string: ~60 bytes a chunk in the Map). A chunk is *measured*
 * (hashed, its stored size known) while its content streams; it is *counted*
 * only once an image lists a content that holds it, like file contents in
 * ContentTable. One Map holds both states: value = stored size when counted,
 * -(stored size + 1) while only measured.
 */

/** Chunk sizes accepted by --chunks. */
export const MIN_CHUNK_BYTES = 4 * 1024;
export const MAX_CHUNK_BYTES = 64 * 1024 * 1024;

export class ChunkTable {
  private readonly chunks = new Map<string, number>();
  /** Chunk keys of measured contents that no image listed yet, by content key. */
  private readonly uncounted = new Map<string, string[]>();

  distinct = 0;
  distinctBytes = 0;
  storedBytes = 0;
  gzipChunks = 0;

  constructor(readonly size: number) {}

  /** Whether a chunk was measured already (counted or not). */
  has(chunkKey: string): boolean {
    return this.chunks.has(chunkKey);
  }

  /** Records a measured chunk and its stored size (not counted yet). */
  measured(chunkKey: string, stored: number): void {
    if (!this.chunks.has(chunkKey)) this.chunks.set(chunkKey, -(stored + 1));
  }

  /** The chunk keys of a measured content, in order, until an image lists it. */
  setContentChunks(contentKey: string, keys: string[]): void {
    this.uncounted.set(contentKey, keys);
  }

  /** An image lists a content for the first time anywhere: its chunks count now. */
  countContent(contentKey: string, contentSize: number): void {
    const keys = this.uncounted.get(contentKey);
    if (!keys) throw new Error('chunks of a listed content were never measured');
    this.uncounted.delete(contentKey);
    keys.forEach((k, i) => {
      const v = this.chunks.get(k);
      if (v === undefined || v >= 0) return; // counted already (another content holds it)
      const stored = -v - 1;
      const bytes = i < keys.length - 1 ? this.size : contentSize - this.size * (keys.length - 1);
      this.chunks.set(k, stored);
      this.distinct++;
      this.distinctBytes += bytes;
      this.storedBytes += stored;
      if (stored < bytes) this.gzipChunks++;
    });
  }

  /** Chunks of a content of `size` bytes. */
  chunksOf(size: number): number {
    return Math.ceil(size / this.size);
  }
}
