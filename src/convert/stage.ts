/**
 * ContentStage: a temporary content-addressed directory holding each distinct
 * file content of the image being converted, so file contents never sit in
 * memory and each is uploaded from disk (re-openable for retries).
 *
 * Layout: DIR/<64 hex>       (complete, verified by construction: renamed after hashing)
 *         DIR/<64 hex>.gz    (its gzip form, renamed when complete)
 *         DIR/tmp-<pid>-<n>  (being written)
 *
 * DIR is a scratch directory (scratch.ts) keyed by the source digest: a
 * conversion killed with -9 leaves it, and the rerun of the same conversion
 * takes it over and reuses what it holds (no second gzip of each file), then
 * removes it at the end.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { readdir, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { once } from 'node:events';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { claimScratch, type Scratch } from './scratch.js';

/** Bodies up to this size are hashed in memory before anything is written (ContentStage.add). */
export const SMALL_BODY_BYTES = 256 * 1024;

export class ContentStage {
  private seq = 0;
  private readonly known = new Map<string, number>();
  /** Contents and gzip forms found from an interrupted run and used again. */
  reusedContents = 0;
  reusedGzip = 0;
  private readonly leftGzip = new Set<string>();
  private readonly leftContents = new Set<string>();

  private constructor(private readonly scratch: Scratch) {}

  get dir(): string {
    return this.scratch.dir;
  }

  /** True when the stage was left by an interrupted run of the same conversion. */
  get reused(): boolean {
    return this.scratch.reused;
  }

  /**
   * A stage under `parent` (default: the OS temp dir): `gear-convert-<key>`
   * when a key (the source digest's hex) is given, reusing what an
   * interrupted run left there.
   */
  static async create(parent: string = tmpdir(), key?: string): Promise<ContentStage> {
    const stage = new ContentStage(await claimScratch(parent, 'gear-convert-', key));
    if (stage.reused) await stage.adopt();
    return stage;
  }

  /** Takes stock of an interrupted run's stage: complete contents kept, partial writes removed. */
  private async adopt(): Promise<void> {
    for (const name of await readdir(this.dir)) {
      const m = /^([a-f0-9]{64})(\.gz)?$/.exec(name);
      if (m) {
        if (m[2]) this.leftGzip.add(`sha256:${m[1]}`);
        else {
          const st = await stat(join(this.dir, name));
          if (st.isFile()) {
            this.known.set(`sha256:${m[1]}`, st.size);
            this.leftContents.add(`sha256:${m[1]}`);
          }
        }
      } else if (name.startsWith('tmp-') || name.includes('.tmp-') || name.startsWith('index-layer-')) {
        await unlink(join(this.dir, name)).catch(() => undefined);
      }
    }
  }

  /**
   * Streams `body` to disk while hashing; returns the content digest. Same
   * content is kept once. A body of at most `inMemoryBytes` (known from its
   * tar header) is hashed in memory and written only when its content is new:
   * an image of a million small files with few distinct contents then costs
   * a few file writes, not a million temp files.
   */
  async add(body: AsyncIterable<Buffer>, knownSize?: number): Promise<{ digest: string; size: number }> {
    if (knownSize !== undefined && knownSize <= SMALL_BODY_BYTES) return this.addSmall(body);
    const tmp = join(this.dir, `tmp-${process.pid}-${this.seq++}`);
    const h = createHash('sha256');
    const out = createWriteStream(tmp);
    let size = 0;
    try {
      for await (const c of body) {
        h.update(c);
        size += c.length;
        if (!out.write(c)) await once(out, 'drain');
      }
      out.end();
      await once(out, 'finish');
    } catch (err) {
      out.destroy();
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    const hex = h.digest('hex');
    const digest = `sha256:${hex}`;
    if (this.known.has(digest)) {
      await unlink(tmp);
      if (this.leftContents.delete(digest)) this.reusedContents++;
    } else {
      await rename(tmp, join(this.dir, hex));
      this.known.set(digest, size);
    }
    return { digest, size };
  }

  private async addSmall(body: AsyncIterable<Buffer>): Promise<{ digest: string; size: number }> {
    const parts: Buffer[] = [];
    let size = 0;
    for await (const c of body) {
      parts.push(c);
      size += c.length;
      if (size > SMALL_BODY_BYTES) throw new Error(`a tar body grew past its header size (${size} bytes)`);
    }
    const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
    const hex = createHash('sha256').update(data).digest('hex');
    const digest = `sha256:${hex}`;
    if (this.known.has(digest)) {
      if (this.leftContents.delete(digest)) this.reusedContents++;
    } else {
      const tmp = join(this.dir, `tmp-${process.pid}-${this.seq++}`);
      await writeFile(tmp, data, { flag: 'wx' });
      await rename(tmp, join(this.dir, hex));
      this.known.set(digest, size);
    }
    return { digest, size };
  }

  /** Path of a staged content. */
  path(digest: string): string {
    return join(this.dir, digest.slice('sha256:'.length));
  }

  /**
   * Gzips a staged content into `<hex>.gz` (one member, fixed level: same
   * bytes for the same input with the same zlib). Returns the blob's digest,
   * size and path.
   */
  async gzip(digest: string, level: number): Promise<{ digest: string; size: number; path: string }> {
    const path = `${this.path(digest)}.gz`;
    if (this.leftGzip.delete(digest)) {
      // Complete by construction (renamed after the write); only its digest is needed.
      const h = createHash('sha256');
      let size = 0;
      for await (const c of createReadStream(path)) {
        h.update(c as Buffer);
        size += (c as Buffer).length;
      }
      this.reusedGzip++;
      return { digest: `sha256:${h.digest('hex')}`, size, path };
    }
    const tmp = `${path}.tmp-${process.pid}-${this.seq++}`;
    const h = createHash('sha256');
    let size = 0;
    try {
      await pipeline(
        createReadStream(this.path(digest)),
        createGzip({ level }),
        async function* (src: AsyncIterable<Buffer>) {
          for await (const c of src) {
            h.update(c);
            size += c.length;
            yield c;
          }
        },
        createWriteStream(tmp),
      );
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
    await rename(tmp, path);
    return { digest: `sha256:${h.digest('hex')}`, size, path };
  }

  has(digest: string): boolean {
    return this.known.has(digest);
  }

  async size(digest: string): Promise<number> {
    return (await stat(this.path(digest))).size;
  }

  /** Removes the stage. Idempotent. */
  async close(): Promise<void> {
    await this.scratch.release();
  }
}
