/**
 * The fs-verity file digest (Linux fs-verity v1, sha256, 4 KiB blocks, no
 * salt): what `fsverity digest` prints and FS_IOC_MEASURE_VERITY answers for a
 * file with fs-verity enabled. Pure computation from the content, so that the
 * converter can put it in the index (docs/pool-integrity.md, "Not
 * implemented: fs-verity enforcement"); nothing here needs kernel support.
 *
 * Merkle tree: each 4 KiB block of the content (the last one zero-padded) is
 * hashed; the hashes are concatenated and cut into 4 KiB blocks (the last one
 * zero-padded), which are hashed in turn, until one hash is left: the root
 * hash (all zeroes for an empty file). The file digest is the sha256 of the
 * 256-byte `struct fsverity_descriptor` {version 1, hash algorithm 1, log2 of
 * the block size, salt size 0, signature size 0, data size (le64), root hash
 * (64 bytes, zero-padded), salt (32 zero bytes), 144 reserved zero bytes}.
 */
import { createHash } from 'node:crypto';

const BLOCK = 4096;
const LOG_BLOCK = 12;
const HASH = 32;
const FS_VERITY_HASH_ALG_SHA256 = 1;

const sha256 = (b: Uint8Array): Buffer => createHash('sha256').update(b).digest();

/** Incremental fs-verity digest: update() with the content in order, then digest(). */
export class FsverityHasher {
  private readonly partial = Buffer.alloc(BLOCK);
  private fill = 0;
  private size = 0;
  /** level-0 hashes, in order */
  private readonly leaves: Buffer[] = [];
  private done = false;

  update(chunk: Uint8Array): this {
    if (this.done) throw new Error('FsverityHasher: update after digest');
    let off = 0;
    this.size += chunk.length;
    while (off < chunk.length) {
      const n = Math.min(BLOCK - this.fill, chunk.length - off);
      this.partial.set(chunk.subarray(off, off + n), this.fill);
      this.fill += n;
      off += n;
      if (this.fill === BLOCK) {
        this.leaves.push(sha256(this.partial));
        this.fill = 0;
      }
    }
    return this;
  }

  /** The root hash of the Merkle tree (32 zero bytes for empty content). */
  rootHash(): Buffer {
    if (!this.done) {
      if (this.fill > 0) {
        this.partial.fill(0, this.fill);
        this.leaves.push(sha256(this.partial));
        this.fill = 0;
      }
      this.done = true;
    }
    if (this.size === 0) return Buffer.alloc(HASH);
    let level = this.leaves;
    const perBlock = BLOCK / HASH;
    while (level.length > 1) {
      const next: Buffer[] = [];
      for (let i = 0; i < level.length; i += perBlock) {
        const block = Buffer.alloc(BLOCK);
        level.slice(i, i + perBlock).forEach((h, j) => h.copy(block, j * HASH));
        next.push(sha256(block));
      }
      level = next;
    }
    return level[0]!;
  }

  /** `sha256:<hex>` of the fs-verity descriptor. */
  digest(): string {
    const root = this.rootHash();
    const d = Buffer.alloc(256);
    d[0] = 1; // version
    d[1] = FS_VERITY_HASH_ALG_SHA256;
    d[2] = LOG_BLOCK;
    d[3] = 0; // salt size
    // 4..7: signature size (0)
    d.writeBigUInt64LE(BigInt(this.size), 8);
    root.copy(d, 16);
    // 80..111 salt, 112..255 reserved: zero
    return `sha256:${sha256(d).toString('hex')}`;
  }
}

/** The fs-verity file digest of some content. */
export async function fsverityDigest(content: Uint8Array | AsyncIterable<Uint8Array>): Promise<string> {
  const h = new FsverityHasher();
  if (content instanceof Uint8Array) h.update(content);
  else for await (const c of content) h.update(c);
  return h.digest();
}
