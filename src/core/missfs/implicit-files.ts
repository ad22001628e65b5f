/**
 * Files the kernel reads without opening them (FUSE_NO_OPEN_SUPPORT).
 *
 * When the server answers the first OPEN with ENOSYS on a kernel that offered
 * NO_OPEN_SUPPORT, the kernel stops sending OPEN and RELEASE for files on that
 * connection: opening a file costs no request at all, its pages stay cached
 * across opens (FOPEN_KEEP_CACHE is the kernel's default then), and READs of
 * pages not cached yet arrive with fh 0 and the node id.
 *
 * That is what makes a file read again after its lazy fetch native: overlayfs
 * binds a metacopy file's data to the miss filesystem's inode at the file's
 * first open, and every later open in that container opens the FUSE inode
 * again — with OPEN requests, a round trip to this process each time (see
 * bench/README.md, "Re-read throughput").
 *
 * ImplicitFiles keeps the provider's MissFile of a node while READs use it:
 * opened at the first READ that needs it (provider.open fetches again when the
 * pool copy went), shared by concurrent reads, closed when unused for `idleMs`,
 * when the kernel forgets the node, or, oldest idle first, beyond `max` open
 * files (each holds a pool descriptor).
 *
 * A file whose read failed stays as an open file would: its own rules decide
 * what a later read does (a streamed download that failed verification fails
 * every read, as it does for an open descriptor), until no read used it for
 * `failedIdleMs` (5 s) — the "next open" of a kernel that sends none. Closing
 * it at the failure instead made each failed READ start a whole new download:
 * the kernel's readahead READs failed, the read of the page the reader waited
 * for opened the file again, and `sha256sum` of a 16 MiB file behind a
 * corrupting registry took 24 s of downloads before its EIO (2 s with OPEN;
 * test/unit/stream-fetch.test.ts (d), one run). The pages a failed download
 * served are dropped by the runtime (MissFsMount.dropUnverified).
 */
import { raceAbort } from '../abort.js';
import type { MissFile } from './types.js';

export interface ImplicitFilesOptions {
  /** provider.open of `sha256:<hex>`; `signal` aborts only when the session ends. */
  open: (hex: string, signal: AbortSignal) => Promise<MissFile>;
  /** Closes a file that is no longer used (never throws). */
  close: (ino: bigint, hex: string, file: MissFile) => Promise<void>;
  /** Open files kept at most (idle ones beyond it are closed, least recently used first). Default 1024. */
  max?: number;
  /** Idle time after which a file is closed. Default 30 s. */
  idleMs?: number;
  /** Idle time after which a file whose read failed is closed. Default 5 s (never above idleMs). */
  failedIdleMs?: number;
}

interface Entry {
  ino: bigint;
  hex: string;
  file: MissFile | undefined;
  opening: Promise<MissFile> | undefined;
  /** Reads using the file now. */
  users: number;
  lastUse: number;
  /** Close once the last user is done (forgotten or trimmed while in use). */
  dropped: boolean;
  /** A read of the file failed: it is closed after failedIdleMs without reads. */
  failed: boolean;
}

export class ImplicitFiles {
  /** By inode, least recently used first (Map insertion order). */
  private readonly entries = new Map<bigint, Entry>();
  private readonly controller = new AbortController();
  private readonly closing = new Set<Promise<void>>();
  private readonly max: number;
  private readonly idleMs: number;
  private readonly failedIdleMs: number;
  private readonly timer: NodeJS.Timeout;
  private ended = false;
  /** provider.open calls made (the `opens` a READ caused). */
  opened = 0;

  constructor(private readonly opts: ImplicitFilesOptions) {
    this.max = Math.max(1, opts.max ?? 1024);
    this.idleMs = Math.max(0, opts.idleMs ?? 30_000);
    this.failedIdleMs = Math.min(this.idleMs, Math.max(0, opts.failedIdleMs ?? 5_000));
    this.timer = setInterval(() => this.sweep(Date.now()), Math.max(1_000, Math.min(this.failedIdleMs, 10_000)));
    this.timer.unref();
  }

  /** Files open now (or being opened). */
  get size(): number {
    return this.entries.size;
  }

  /**
   * Runs `read` with node ino's file, opening it first when needed; the file
   * stays open at least until `read` settles. `signal` (the READ's) abandons
   * the wait for the open, not the open itself. A failed open is not kept:
   * the next READ opens again. A rejected `read` marks the file failed (see
   * the file comment).
   */
  async use<T>(ino: bigint, hex: string, signal: AbortSignal, read: (file: MissFile) => Promise<T>): Promise<T> {
    if (this.ended) throw new Error('the miss filesystem session ended');
    let e = this.entries.get(ino);
    if (e && e.hex !== hex) {
      this.dropEntry(e);
      e = undefined;
    }
    if (e) this.entries.delete(ino);
    else e = { ino, hex, file: undefined, opening: undefined, users: 0, lastUse: 0, dropped: false, failed: false };
    this.entries.set(ino, e); // most recently used last
    e.users++;
    e.lastUse = Date.now();
    let opened = false;
    let ok = false;
    try {
      const file = e.file ?? (await raceAbort(this.openEntry(e), signal));
      opened = true;
      const result = await read(file);
      ok = true;
      return result;
    } finally {
      e.users--;
      e.lastUse = Date.now();
      if (!ok && opened && !signal.aborted) e.failed = true;
      if (e.dropped) this.dropEntry(e);
      else this.trim();
    }
  }

  /** The kernel forgot node ino (or its pool copy was found corrupt): close its file once unused. */
  drop(ino: bigint): void {
    const e = this.entries.get(ino);
    if (e) this.dropEntry(e);
  }

  /** Closes every file (the session ended); waits for the closes. */
  async closeAll(): Promise<void> {
    this.ended = true;
    clearInterval(this.timer);
    this.controller.abort(new Error('the miss filesystem session ended'));
    for (const e of [...this.entries.values()]) {
      e.users = 0;
      this.dropEntry(e);
    }
    await Promise.allSettled([...this.closing]);
  }

  /** Closes files unused for idleMs (failedIdleMs for a file whose read failed). */
  sweep(now: number): void {
    for (const e of [...this.entries.values()]) {
      if (e.users === 0 && e.opening === undefined && now - e.lastUse >= (e.failed ? this.failedIdleMs : this.idleMs)) this.dropEntry(e);
    }
  }

  private openEntry(e: Entry): Promise<MissFile> {
    if (e.opening) return e.opening;
    this.opened++;
    const opening = this.opts.open(e.hex, this.controller.signal).then(
      (file) => {
        e.opening = undefined;
        e.file = file;
        // Dropped while opening (and nobody is waiting any more): close it now.
        if (e.dropped && e.users === 0) this.closeFile(e, file);
        return file;
      },
      (err: unknown) => {
        e.opening = undefined;
        e.dropped = true;
        if (e.users === 0) this.dropEntry(e);
        throw err;
      },
    );
    e.opening = opening;
    return opening;
  }

  private dropEntry(e: Entry): void {
    e.dropped = true;
    if (this.entries.get(e.ino) === e) this.entries.delete(e.ino);
    if (e.users > 0 || e.opening !== undefined) return; // closed by the last user / when the open settles
    const file = e.file;
    e.file = undefined;
    if (file) this.closeFile(e, file);
  }

  private closeFile(e: Entry, file: MissFile): void {
    const p = this.opts.close(e.ino, e.hex, file).catch(() => undefined);
    this.closing.add(p);
    void p.finally(() => this.closing.delete(p));
  }

  /** Beyond max: close idle files, least recently used first, down to 90% of max. */
  private trim(): void {
    if (this.entries.size <= this.max) return;
    const target = Math.floor(this.max * 0.9);
    for (const e of [...this.entries.values()]) {
      if (this.entries.size <= target) break;
      if (e.users === 0 && e.opening === undefined) this.dropEntry(e);
    }
  }
}
