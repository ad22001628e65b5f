/**
 * MemberStage: the format v3 content sink of a conversion (Flattener's
 * `addDeferred`). Each regular file's body is hashed and compressed as it
 * streams out of the layer, off the main thread (member-pool.ts):
 *
 * - a file below CHUNK_MIN_FILE_BYTES is one member: its body is copied into
 *   one buffer and handed to a worker, which returns its content digest and
 *   stored bytes;
 * - a bigger file is cut into CHUNK_BYTES chunks, each a task (chunk digest +
 *   stored bytes); its content digest is hashed here as it streams.
 *
 * Members whose digest is already stored where this conversion can reuse it
 * (a pack of an image given for reuse, or a complete pack a killed run of the
 * same conversion left in the staging directory) are not compressed at all.
 * The stored bytes of the others are appended to a spool file in the staging
 * directory (never held in memory beyond the tasks in flight); early-packs.ts
 * cuts them into packs in the order the contents were given, as they come back.
 *
 * The staging directory is the conversion's scratch directory (scratch.ts),
 * keyed by the source digest: a kill -9 leaves it, and the rerun takes it
 * over. Spool files of a dead run are useless (their table was in memory)
 * and removed; its complete packs (`pack-<key>` with `pack-<key>.json`) are
 * kept and their members become known (packs.ts).
 */
import { createHash } from 'node:crypto';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { MemberPool, MemberResult } from './member-pool.js';
import { CHUNK_BYTES, CHUNK_MIN_FILE_BYTES, type Encoding } from './pack-plan.js';

/** Where a member's stored bytes are. */
export type MemberSource =
  /** In a local file of the stage (the spool, or a complete pack a killed run left). */
  | { kind: 'local'; file: string; offset: number }
  /** In pack `pack` of reusable image `image` (reuse.ts). */
  | { kind: 'old'; image: number; pack: number; offset: number };

export interface StagedMember {
  /** sha256 hex of the member's bytes (the content, or the chunk). */
  hex: string;
  /** Byte count of the member (decompressed). */
  size: number;
  /** Stored bytes. */
  length: number;
  encoding: Encoding;
  src: MemberSource;
}

export interface StagedContent {
  digest: string;
  size: number;
  /** Set when chunked: the chunk size; members are the chunks in order. */
  chunkSize?: number;
  members: StagedMember[];
}

/** A batch of members sent to a worker in one task: at most this many bytes or items. */
const BATCH_BYTES = 512 * 1024;
const BATCH_ITEMS = 64;
/** Spool writes gather members up to this many bytes. */
const SPOOL_WRITE_BYTES = 4 * 1024 * 1024;
/** Bytes of bodies handed to workers and not yet back, before add waits. */
const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;

export class MemberStage {
  /** Every distinct content seen, by digest. */
  readonly contents = new Map<string, StagedContent>();
  /** Contents reused whole from a reusable image or a killed run's packs. */
  private inFlight = 0;
  private waiters: (() => void)[] = [];
  private spool?: Promise<FileHandle>;
  private tasks = 0;
  private spoolSize = 0;
  private readonly writes = new Set<Promise<unknown>>();
  private failed: unknown;
  readonly spoolFile: string;
  /** Told of each content in the order it is given (addDeferred), with the promise of its digest (early-packs.ts). */
  onContent?: (done: Promise<{ digest: string; size: number }>) => void;
  /** Members compressed (not known), and their bytes in and out. */
  readonly stats = { members: 0, bytesIn: 0, bytesStored: 0, knownMembers: 0 };

  constructor(
    private readonly dir: string,
    private readonly pool: MemberPool,
    /** Reusable members by hex (what the workers skip). */
    private readonly known: ReadonlyMap<string, StagedMember>,
    /** Reusable contents by digest, in their stored layout (an old image's chunking included). */
    private readonly knownContents: ReadonlyMap<string, StagedContent>,
  ) {
    this.spoolFile = join(dir, `spool-${process.pid}`);
    // Members, not worker tasks: small files travel BATCH_ITEMS to a task, so this lets every thread have a
    // few full batches queued (8 members per thread in flight kept python3's workers ~60% idle); the bytes bound memory.
    this.maxTasks = Math.max(4, pool.threads) * BATCH_ITEMS * 2;
  }

  /** Members handed to the workers and not back yet, at most (addDeferred waits beyond; also the bytes bound). */
  readonly maxTasks: number;

  private spoolHandle(): Promise<FileHandle> {
    this.spool ??= open(this.spoolFile, 'w', 0o600);
    return this.spool;
  }

  /**
   * Appends stored bytes to the spool; returns their offset. Small members are
   * gathered into SPOOL_WRITE_BYTES before one write (one call per few MiB, not
   * per file); every write completes before finish().
   */
  private pending: Buffer = Buffer.allocUnsafeSlow(SPOOL_WRITE_BYTES);
  /** Gathered bytes: spool offsets [pendingAt, pendingAt + pendingBytes), always ending at spoolSize. */
  private pendingBytes = 0;
  private pendingAt = 0;
  private append(bytes: Uint8Array): number {
    if (bytes.length >= SPOOL_WRITE_BYTES / 4) {
      this.flush();
      const offset = this.spoolSize;
      this.spoolSize += bytes.length;
      this.write(bytes, offset);
      return offset;
    }
    if (this.pendingBytes + bytes.length > SPOOL_WRITE_BYTES) this.flush();
    if (this.pendingBytes === 0) this.pendingAt = this.spoolSize;
    this.pending.set(bytes, this.pendingBytes);
    this.pendingBytes += bytes.length;
    const offset = this.spoolSize;
    this.spoolSize += bytes.length;
    return offset;
  }

  private flush(): void {
    if (this.pendingBytes === 0) return;
    this.write(this.pending.subarray(0, this.pendingBytes), this.pendingAt);
    this.pending = Buffer.allocUnsafeSlow(SPOOL_WRITE_BYTES);
    this.pendingBytes = 0;
  }

  private write(bytes: Uint8Array, offset: number): void {
    const w = this.spoolHandle()
      .then((fh) => fh.write(bytes, 0, bytes.length, offset))
      .then(
        () => undefined,
        (err: unknown) => {
          this.failed ??= err;
        },
      );
    this.writes.add(w);
    void w.finally(() => this.writes.delete(w));
  }

  private async admit(bytes: number): Promise<void> {
    while (this.inFlight > 0 && (this.inFlight + bytes > MAX_IN_FLIGHT_BYTES || this.tasks >= this.maxTasks)) {
      await new Promise<void>((r) => this.waiters.push(r));
    }
    if (this.failed) throw this.failed;
    this.inFlight += bytes;
    this.tasks++;
  }

  private release(bytes: number): void {
    this.inFlight -= bytes;
    this.tasks--;
    const w = this.waiters;
    this.waiters = [];
    for (const r of w) r();
  }

  /**
   * One member (its bytes in `parts`) through a worker, in a batch with others: known, or stored bytes
   * spooled. The caller admitted it first (admit), so that the reading waits, not a queue of bodies.
   */
  private async member(parts: Uint8Array[], size: number): Promise<StagedMember | (MemberResult & { known: true })> {
    const r = await this.batched(parts, size).finally(() => this.release(size));
    if (r.known) {
      this.stats.knownMembers++;
      return r as MemberResult & { known: true };
    }
    const bytes = r.bytes!;
    this.stats.members++;
    this.stats.bytesIn += size;
    this.stats.bytesStored += bytes.length;
    const offset = this.append(bytes);
    return { hex: r.hex, size, length: bytes.length, encoding: r.encoding!, src: { kind: 'local', file: this.spoolFile, offset } };
  }

  /**
   * Members go to the workers in batches: the bytes of up to BATCH_ITEMS small
   * members copied into one BATCH_BYTES buffer (a message and a buffer per
   * small file cost more than hashing it); a member of half a batch or more
   * (a chunk) goes alone. A batch leaves when full, or on the next turn of the
   * event loop (so nothing waits for input that will not come). The copy into
   * the batch is synchronous: a batch never leaves half written.
   */
  private batch?: { buf: Buffer; items: [number, number][]; used: number; send: () => void; results: Promise<MemberResult[]> };
  private batched(parts: Uint8Array[], size: number): Promise<MemberResult> {
    const copy = (buf: Buffer, at: number) => {
      for (const p of parts) {
        buf.set(p, at);
        at += p.length;
      }
    };
    if (size >= BATCH_BYTES / 2) {
      const own = parts.length === 1 && parts[0]!.byteOffset === 0 && parts[0]!.byteLength === parts[0]!.buffer.byteLength ? parts[0]! : undefined;
      let buf: Uint8Array;
      if (own) buf = own;
      else {
        const b = Buffer.allocUnsafeSlow(size);
        copy(b, 0);
        buf = b;
      }
      return this.pool.run(buf, [[0, size]], this.known.size > 0).then((rs) => rs[0]!);
    }
    if (this.batch && (this.batch.used + size > BATCH_BYTES || this.batch.items.length >= BATCH_ITEMS)) {
      this.batch.send();
      this.batch = undefined;
    }
    if (!this.batch) {
      let send!: () => void;
      const gate = new Promise<void>((r) => (send = r));
      const buf = Buffer.allocUnsafeSlow(BATCH_BYTES);
      const items: [number, number][] = [];
      const b = { buf, items, used: 0, send, results: gate.then(() => this.pool.run(buf, items, this.known.size > 0)) };
      this.batch = b;
      setImmediate(() => {
        if (this.batch === b) this.batch = undefined;
        send();
      });
    }
    const b = this.batch;
    copy(b.buf, b.used);
    const i = b.items.push([b.used, size]) - 1;
    b.used += size;
    return b.results.then((rs) => rs[i]!);
  }

  private knownMember(hex: string): StagedMember {
    const m = this.known.get(hex);
    if (!m) throw new Error(`internal: member ${hex} reported known but not in the known set`);
    return { ...m, src: { ...m.src } };
  }

  /** Records a content whose members are ready (first one wins: same digest, same bytes). */
  private settle(c: StagedContent): void {
    if (!this.contents.has(c.digest)) this.contents.set(c.digest, c);
  }

  /**
   * Reads `body` (a tar entry of `size` bytes) now; resolves, once it has
   * been read, to a promise of its content digest (hashed and stored by the
   * workers meanwhile). Flattener awaits the outer promise before it reads the
   * next entry, and the inner ones at the end of the layer.
   */
  async addDeferred(body: AsyncIterable<Buffer>, size: number): Promise<{ done: Promise<{ digest: string; size: number }> }> {
    if (this.failed) throw this.failed;
    if (size < CHUNK_MIN_FILE_BYTES) {
      // The body's chunks as they come (views of the decompressed layer); copied once, into the worker batch.
      const parts: Buffer[] = [];
      let n = 0;
      for await (const c of body) {
        if (n + c.length > size) throw new Error(`a tar body grew past its header size (${size} bytes)`);
        parts.push(c);
        n += c.length;
      }
      if (n !== size) throw new Error(`a tar body ended after ${n} of its ${size} bytes`);
      await this.admit(size);
      const done = this.member(parts, size).then((m) => {
        const digest = `sha256:${m.hex}`;
        if (!this.contents.has(digest)) {
          const whole = this.knownContents.get(digest);
          if (whole) this.settle(copyContent(whole));
          else this.settle({ digest, size, members: [('src' in m ? m : this.knownMember(m.hex))] });
        }
        return { digest, size };
      });
      done.catch(() => undefined); // awaited by the flattener; never an unhandled rejection meanwhile
      this.onContent?.(done);
      return { done };
    }
    // Chunked: chunks go to the workers as they fill; the content digest is hashed here.
    const whole = createHash('sha256');
    const chunks: Promise<StagedMember | (MemberResult & { known: true })>[] = [];
    let buf = Buffer.allocUnsafeSlow(Math.min(CHUNK_BYTES, size));
    let fill = 0;
    let total = 0;
    for await (const c of body) {
      if (total + c.length > size) throw new Error(`a tar body grew past its header size (${size} bytes)`);
      whole.update(c);
      total += c.length;
      let at = 0;
      while (at < c.length) {
        const n = Math.min(c.length - at, buf.length - fill);
        c.copy(buf, fill, at, at + n);
        fill += n;
        at += n;
        if (fill === buf.length) {
          await this.admit(buf.length);
          const p = this.member([buf], buf.length);
          p.catch(() => undefined);
          chunks.push(p);
          const left = size - (total - (c.length - at));
          buf = Buffer.allocUnsafeSlow(Math.max(1, Math.min(CHUNK_BYTES, left)));
          fill = 0;
        }
      }
    }
    if (total !== size) throw new Error(`a tar body ended after ${total} of its ${size} bytes`);
    const digest = `sha256:${whole.digest('hex')}`;
    const done = Promise.all(chunks).then((ms) => {
      if (!this.contents.has(digest)) {
        const old = this.knownContents.get(digest);
        if (old) this.settle(copyContent(old));
        else this.settle({ digest, size, chunkSize: CHUNK_BYTES, members: ms.map((m) => ('src' in m ? m : this.knownMember(m.hex))) });
      }
      return { digest, size };
    });
    done.catch(() => undefined);
    this.onContent?.(done);
    return { done };
  }

  /** Plain add (the Flattener sink signature): addDeferred, awaited. */
  async add(body: AsyncIterable<Buffer>, size?: number): Promise<{ digest: string; size: number }> {
    if (size === undefined) throw new Error('MemberStage.add needs the size from the tar header');
    return (await this.addDeferred(body, size)).done;
  }

  /**
   * Writes what is gathered and waits for the spool writes issued so far: the
   * spool then holds every member returned until now (early-packs.ts reads a
   * full pack's members from it).
   */
  async flushed(): Promise<void> {
    this.flush();
    await Promise.all([...this.writes]);
    if (this.failed) throw this.failed;
  }

  /** Waits for every spool write; the spool is then complete for packs.ts to read. */
  async finish(): Promise<void> {
    do {
      await this.flushed();
    } while (this.writes.size);
    if (this.spool) await (await this.spool).close();
    this.spool = undefined;
  }

  get dirPath(): string {
    return this.dir;
  }
}

function copyContent(c: StagedContent): StagedContent {
  return { ...c, members: c.members.map((m) => ({ ...m, src: { ...m.src } })) };
}
