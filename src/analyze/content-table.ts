/**
 * ContentTable: one compact record per distinct file content seen by
 * `gear analyze`, for hundreds of images at once.
 *
 * A record is a slot in parallel typed arrays (size, stored size, gzip digest,
 * image membership), found through a Map keyed by the 32 raw digest bytes as a
 * one-byte string: ~150 bytes per distinct content, whatever the number of
 * images. Image membership is the last image that listed the content plus, only
 * for contents in two images or more, the list of those images (images are
 * measured one after the other, so "already in this image" is "last image is
 * this one").
 *
 * A content is first *seen* (streamed, hashed, its stored size known) and only
 * then *listed* by an image whose flattened tree holds it. A content seen in a
 * layer but hidden by a later one (overwritten, whited out) keeps its record
 * (so a layer measured once never needs its gzip sizes again) but counts in no
 * figure until an image lists it.
 */

const DIGEST_BYTES = 32;

/** "sha256:<hex>" → the table key (raw digest bytes as a latin1 string). */
export function digestKey(digest: string): string {
  return Buffer.from(digest.slice('sha256:'.length), 'hex').toString('latin1');
}

export class ContentTable {
  private readonly ids = new Map<string, number>();
  private count = 0;
  private sizes = new Float64Array(1024);
  private stored = new Float64Array(1024);
  /** 1 when the content is stored as a gzip blob (gzDigests holds its digest). */
  private gz = new Uint8Array(1024);
  private gzDigests = new Uint8Array(1024 * DIGEST_BYTES);
  /** Last image (0-based) that listed the content; -1: seen, not listed yet. */
  private lastImage = new Int32Array(1024).fill(-1);
  private imageCount = new Int32Array(1024);
  /** Images listing a content, for contents listed by two images or more. */
  readonly shared = new Map<number, number[]>();

  /** Distinct contents listed by at least one image. */
  listedContents = 0;
  listedBytes = 0;
  listedStoredBytes = 0;
  gzipBlobs = 0;

  private grow(): void {
    const n = this.sizes.length * 2;
    const f64 = (a: Float64Array) => {
      const b = new Float64Array(n);
      b.set(a);
      return b;
    };
    this.sizes = f64(this.sizes);
    this.stored = f64(this.stored);
    const gz = new Uint8Array(n);
    gz.set(this.gz);
    this.gz = gz;
    const gzd = new Uint8Array(n * DIGEST_BYTES);
    gzd.set(this.gzDigests);
    this.gzDigests = gzd;
    const last = new Int32Array(n).fill(-1);
    last.set(this.lastImage);
    this.lastImage = last;
    const cnt = new Int32Array(n);
    cnt.set(this.imageCount);
    this.imageCount = cnt;
  }

  has(key: string): boolean {
    return this.ids.has(key);
  }

  /**
   * Records a content that was just measured. `gzipDigest` is the digest of its
   * gzip blob when it would be stored gzipped (stored = that blob's size),
   * undefined when stored raw (stored = size).
   */
  add(key: string, size: number, stored: number, gzipDigest?: Buffer): void {
    if (this.ids.has(key)) return;
    if (this.count === this.sizes.length) this.grow();
    const id = this.count++;
    this.ids.set(key, id);
    this.sizes[id] = size;
    this.stored[id] = stored;
    this.lastImage[id] = -1;
    this.imageCount[id] = 0;
    if (gzipDigest) {
      if (gzipDigest.length !== DIGEST_BYTES) throw new Error('gzip digest must be 32 bytes');
      this.gz[id] = 1;
      this.gzDigests.set(gzipDigest, id * DIGEST_BYTES);
    } else this.gz[id] = 0;
  }

  /** How a content is stored: its gzip blob (digest "sha256:…", size) or undefined when raw. */
  gzipBlob(key: string): { digest: string; size: number } | undefined {
    const id = this.ids.get(key);
    if (id === undefined || this.gz[id] !== 1) return undefined;
    const hex = Buffer.from(this.gzDigests.subarray(id * DIGEST_BYTES, (id + 1) * DIGEST_BYTES)).toString('hex');
    return { digest: `sha256:${hex}`, size: this.stored[id]! };
  }

  /**
   * Image `image` lists the content `key` (one file of its flattened tree).
   * Returns whether this is the content's first file in that image, with its
   * size and stored size; throws when the content was never seen.
   */
  list(key: string, image: number): { first: boolean; size: number; stored: number; newGlobally: boolean } {
    const id = this.ids.get(key);
    if (id === undefined) throw new Error('a listed content was never measured');
    const size = this.sizes[id]!;
    const stored = this.stored[id]!;
    const last = this.lastImage[id]!;
    if (last === image) return { first: false, size, stored, newGlobally: false };
    const count = this.imageCount[id]!;
    if (count === 0) {
      this.listedContents++;
      this.listedBytes += size;
      this.listedStoredBytes += stored;
      if (this.gz[id] === 1) this.gzipBlobs++;
    } else if (count === 1) this.shared.set(id, [last, image]);
    else this.shared.get(id)!.push(image);
    this.imageCount[id] = count + 1;
    this.lastImage[id] = image;
    return { first: true, size, stored, newGlobally: count === 0 };
  }

  sizeOf(id: number): number {
    return this.sizes[id]!;
  }

  /** For each content listed by one image only: (image, size). */
  *singles(): Generator<{ image: number; size: number }> {
    for (const id of this.ids.values()) {
      if (this.imageCount[id] === 1) yield { image: this.lastImage[id]!, size: this.sizes[id]! };
    }
  }
}
