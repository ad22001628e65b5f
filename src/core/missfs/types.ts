/**
 * The contract between the miss filesystem and whatever makes blobs
 * available (the lazy fetcher: registry → verify → pool).
 *
 * Digests are passed as `sha256:<64 lowercase hex>` and are already
 * validated (the name came from a FUSE LOOKUP under /sha256/ab/).
 */

export interface MissProvider {
  /**
   * A LOOKUP of /sha256/ab/<hex>: a container needs this file now. Make the
   * blob available (fetch, verify, store) and resolve its size in bytes.
   *
   * Reject with a GearError of class NotFound (or an error with code ENOENT)
   * for an unknown digest — the reader gets ENOENT — and with anything else
   * (Unavailable, DeadlineExceeded…) for a fetch failure — the reader gets
   * EIO. Neither answer is cached by the kernel, so a later open retries.
   *
   * `signal` aborts when the caller was interrupted (e.g. the process was
   * killed) or the server's request timeout expired; concurrent LOOKUPs of
   * the same digest share one call, aborted only when all of them are gone.
   */
  lookup(digest: string, signal: AbortSignal): Promise<{ size: number }>;

  /**
   * OPEN of a file previously looked up. Returns the reader used for its
   * READ requests; closed on RELEASE. Note: the kernel caches the name for a
   * long time, so an OPEN may arrive without a fresh LOOKUP (for example
   * after the pool copy was evicted): open() must make the blob available
   * again if needed, just as lookup() does.
   */
  open(digest: string, signal: AbortSignal): Promise<MissFile>;

  /**
   * Optional: the file was opened again without open() (the kernel reused the
   * passthrough backing file registered at an earlier open). Record the use
   * (e.g. cache recency). Called from a periodic sweep, at most once per
   * digest per sweep; must not throw or block.
   */
  touch?(digest: string): void;

  /** Optional: a LOOKUP of digest came from process pid (0: not visible from our pid namespace); called before lookup(). */
  noteCaller?(digest: string, pid: number): void;
}

export interface MissFile {
  /**
   * Positioned read into buf (from buf[0]); resolves the bytes read, 0 at
   * end of file. Short reads are fine: the server loops until the kernel's
   * request is filled or 0 is returned.
   */
  read(buf: Buffer, position: number, signal?: AbortSignal): Promise<number>;
  close(): Promise<void>;
  /**
   * A descriptor of the complete, verified file (open for reading, valid
   * until close()), when there is one: the server may then hand it to the
   * kernel (FUSE passthrough) so that reads of this open file never reach
   * this process. Leave it out for anything read() must serve itself (a
   * partially downloaded file, computed content).
   */
  readonly backingFd?: number;
  /**
   * false: the OPEN reply omits FOPEN_KEEP_CACHE, so the kernel drops the
   * pages it cached from earlier opens of this file (bytes served while a big
   * file streamed in are unverified). Default true.
   */
  keepCache?: boolean;
}

/** Counters of one mounted session (monotonic, except the live gauges). */
export interface MissFsStats {
  /** Requests served by the main thread. */
  requests: number;
  /** Static requests (STATFS, GETATTR/LOOKUP of fixed directories, xattrs) answered by the reader thread. */
  staticReplies: number;
  lookups: number;
  lookupErrors: number;
  /**
   * OPENs that reached the main thread (each asks the provider). The reader
   * thread answers later opens of a file whose backing id is still published;
   * those are counted in passthroughOpens only. With noOpen: the provider
   * opens that READs caused.
   */
  opens: number;
  /** OPENs answered with FOPEN_PASSTHROUGH: the kernel reads the pool file directly, no READ reaches us. */
  passthroughOpens: number;
  reads: number;
  bytesRead: number;
  interrupts: number;
  forgets: number;
  timeouts: number;
  /** Requests answered ENOSYS, by opcode name. */
  unsupported: Record<string, number>;
  /** File nodes the kernel currently holds (lookup count > 0). */
  liveNodes: number;
  openFiles: number;
  inflight: number;
  /** Backing files registered with the kernel (one per file with passthrough opens; 0 when none is open). */
  backingIds: number;
  /** Passthrough negotiated and not switched off (by option, or after the kernel refused it). */
  passthrough: boolean;
  /** No OPEN requests for files (FUSE_NO_OPEN_SUPPORT granted): opens are the kernel's alone, READs come with fh 0. */
  noOpen: boolean;
}
