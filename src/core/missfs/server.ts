/**
 * The miss filesystem: a read-only FUSE filesystem served over /dev/fuse,
 * used as the last data-only lower layer of container overlays.
 *
 *   /                      nodeid 1
 *   /sha256                nodeid 2
 *   /sha256/ab             nodeid 16 + 0xab (256 static prefix directories)
 *   /sha256/ab/<64 hex>    one node per digest (nodeid = inode, stable per digest
 *                          for the life of the mount), created by LOOKUP
 *
 * A LOOKUP of a digest asks the MissProvider to make the blob available and
 * answers with its size (root-owned regular file, mode 0444). OPEN/READ are
 * served from the provider's MissFile; RELEASE closes it.
 *
 * Passthrough (kernel ≥ 6.9): OPEN of a complete file is answered
 * FOPEN_PASSTHROUGH with a backing id (passthrough.ts); the reader thread
 * answers later OPENs of it by itself. With `noOpen` the kernel sends no OPEN
 * at all and READs come with fh 0 (implicit-files.ts).
 *
 * Threads: a worker blocks in read(2) on the device (reader-worker.ts) and
 * hands each request to the main thread, which serves requests concurrently
 * (a slow provider call never holds up others) and answers each with one
 * writeSync, in any order, by `unique`.
 */
import { closeSync, openSync, readFileSync, write, writeSync } from 'node:fs';
import path from 'node:path';
import type { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import { describeError, errnoCode, failedPrecondition, GearError, internal, isClass, unavailable } from '../errors.js';
import { abortConnection, registerSession } from './connections.js';
import { mountsAt, prepareMountpoint, runCmd, type MountLine } from './mountpoint.js';
import {
  Errno,
  FOpen,
  FuseProtocolError,
  FUSE_ROOT_ID,
  InitFlag,
  O_ACCMODE,
  Op,
  S_IFDIR,
  S_IFREG,
  W_OK,
  WRITE_OPS,
  direntType,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeError,
  encodeGetxattrOut,
  encodeInitOut,
  encodeNotifyInvalInode,
  encodeOpenOut,
  encodeReply,
  encodeStatfsOut,
  isNoReplyOp,
  negotiateInit,
  opName,
  parseAccessIn,
  parseBatchForgetIn,
  parseForgetIn,
  parseGetxattrIn,
  parseInitIn,
  parseInterruptIn,
  parseName,
  parseOpenIn,
  parseReadIn,
  parseReleaseIn,
  parseRequest,
  peekUnique,
  readBufferSize,
  writeOutHeader,
  type Attr,
  type Dirent,
  type InHeader,
  type InitOut,
  type InitPolicy,
} from './protocol.js';
import { startReaderWorker, type ReaderMessage, type StaticReplies } from './reader-worker.js';
import { ImplicitFiles } from './implicit-files.js';
import { BackingIds } from './passthrough.js';
import type { MissFile, MissFsStats, MissProvider } from './types.js';

export const MISSFS_FSTYPE = 'fuse.gear';
export const MISSFS_SOURCE = 'gear';
/** The verified mount(8) options (fd=3: the /dev/fuse fd is passed as the child's fd 3). */
export const MISSFS_MOUNT_OPTIONS = 'fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,ro,nosuid,nodev';

const SHA256_NODE = 2n;
const PREFIX_NODE_BASE = 16n;
const FILE_INO_BASE = 0x1000n;
const HEX64 = /^[0-9a-f]{64}$/;
const HEX2 = /^[0-9a-f]{2}$/;
/** Hard cap on one READ, whatever the kernel claims (protects against a damaged size field). */
const MAX_READ_BYTES = 16 << 20;
/** File nodes (by inode − FILE_INO_BASE) that can use passthrough; later ones are served through READ. */
const PASSTHROUGH_SLOTS = 1 << 18;

export interface MountMissFsOptions {
  mountpoint: string;
  provider: MissProvider;
  logger: Logger;
  /** Kernel cache time of names and attributes that exist (immutable content): default 24 h. */
  entryTimeoutMs?: number;
  /** Upper bound on any single provider call before the request fails with EIO: default 5 min. */
  requestTimeoutMs?: number;
  /** Bound on mount(8) and on the kernel's INIT arriving: default 30 s. */
  mountTimeoutMs?: number;
  /** INIT: max_write (sizes the device read buffer): default 128 KiB. */
  maxWrite?: number;
  /** INIT: pages per request when the kernel offers MAX_PAGES: default 256 (1 MiB reads). */
  maxPages?: number;
  /** INIT: upper bound on readahead: default 1 MiB. */
  maxReadahead?: number;
  /** INIT: max_background (async reads in flight): default 64. */
  maxBackground?: number;
  /**
   * FUSE passthrough for complete files when the kernel offers it: default
   * true. It makes the FUSE superblock count as stacked (max_stack_depth 1),
   * which overlayfs on top still accepts, but the pool must then be on a
   * non-stacked filesystem (not overlayfs): otherwise the kernel refuses and
   * the session falls back to READ.
   */
  passthrough?: boolean;
  /**
   * Ask the kernel not to send OPEN and RELEASE for files (FUSE_NO_OPEN_SUPPORT,
   * granted at the first OPEN answered ENOSYS): an open then costs no request,
   * the kernel keeps a file's pages cached across opens, and only READs of
   * pages not cached yet reach this process (ImplicitFiles). No passthrough in
   * this mode. Default false. Where the kernel does not offer it, the session
   * works as without it.
   */
  noOpen?: boolean;
  /** With noOpen: how long a file whose read failed stays open without reads (ImplicitFiles failedIdleMs; default 5 s). */
  noOpenFailedIdleMs?: number;
  /**
   * How long a file's backing id stays registered after its last RELEASE, so
   * that opening it again is answered by the reader thread at once: default
   * 5 min; 0 closes it with the last RELEASE. A registered id keeps the pool
   * file open in the kernel (an evicted file's space is freed only when the
   * id goes).
   */
  passthroughLingerMs?: number;
  /** Upper bound on registered backing ids; idle ones are closed, oldest first, beyond it: default 16384. */
  maxBackingIds?: number;
}

export interface UnmountOptions {
  /** Bound on waiting for the kernel to end the session after umount: default 10 s. */
  timeoutMs?: number;
  /** When the session does not end in time, abort the FUSE connection (fusectl): default true. */
  abortOnTimeout?: boolean;
}

export interface MissFsMount {
  readonly mountpoint: string;
  /** The FUSE connection number (minor of the mount's st_dev; /sys/fs/fuse/connections/<N>). */
  readonly connection: number | undefined;
  /** The negotiated INIT parameters. */
  readonly init: InitOut;
  /**
   * Unmounts and waits (bounded) until the kernel ends the session. From the
   * start of unmount, requests that need the provider (LOOKUP of a digest,
   * OPEN, READ) fail with EIO, in flight or new, so that readers let go and
   * the kernel can end the session. Idempotent.
   */
  unmount(opts?: UnmountOptions): Promise<void>;
  /** Resolves when the session has ended (unmounted here or elsewhere, or aborted); never rejects. */
  readonly closed: Promise<void>;
  stats(): MissFsStats;
  /**
   * The pool removed a corrupt copy of hex (scrub): close its lingering passthrough backing id, so
   * the next open asks the provider (which fetches again) instead of reusing the removed inode.
   * False when an open file still uses the id (new opens share it until those are released).
   */
  dropBacking(hex: string): boolean;
  /**
   * A download of hex ended without verifying (a digest mismatch, a broken registry): drop the
   * pages the kernel cached of it (bytes of a streamed file are served unverified, and with
   * GEAR_FUSE_OPEN=none no open drops them).
   */
  dropUnverified(hex: string): void;
}

interface FileNode {
  ino: bigint;
  hex: string;
  size: number;
  nlookup: bigint;
}

interface OpenFile {
  file: MissFile;
  hex: string;
  reads: Set<Promise<void>>;
  /** The file node's inode number (keys `readOpens`). */
  ino: bigint;
  /** The passthrough table slot of a FOPEN_PASSTHROUGH open; -1 for an open served through READ. */
  slot: number;
}

interface Pending {
  unique: bigint;
  opcode: number;
  /** The caller's tgid (0 when not visible from our pid namespace). */
  pid: number;
  replied: boolean;
  controller: AbortController;
  timer?: NodeJS.Timeout;
  /** Polls a caller that was sent a non-fatal signal, in case it dies later. */
  watch?: NodeJS.Timeout;
}

interface SharedLookup {
  controller: AbortController;
  promise: Promise<{ size: number }>;
  waiters: number;
}

type Deferred<T> = { promise: Promise<T>; resolve: (v: T) => void; reject: (e: unknown) => void };
function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

class InterruptedError extends GearError {
  constructor() {
    super('Unavailable', 'request interrupted by the kernel');
    this.name = 'InterruptedError';
  }
}

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    /* already closed */
  }
}

/** errno for a failed provider call. */
function errnoFor(err: unknown): number {
  if (isClass(err, 'NotFound')) return Errno.ENOENT;
  if (isClass(err, 'PermissionDenied')) return Errno.EACCES;
  const code = errnoCode(err);
  if (code === 'ENOENT') return Errno.ENOENT;
  if (code === 'EACCES') return Errno.EACCES;
  return Errno.EIO;
}


export class MissFsSession implements MissFsMount {
  readonly mountpoint: string;
  connection: number | undefined;
  init!: InitOut;
  readonly closed: Promise<void>;

  private readonly provider: MissProvider;
  private readonly log: Logger;
  private readonly debug: boolean;
  private readonly entryTimeoutMs: number;
  private readonly requestTimeoutMs: number;
  private readonly policy: InitPolicy;
  private readonly bufSize: number;
  private readonly mountTime = Math.floor(Date.now() / 1000);

  private fd: number;
  private worker: Worker | undefined;
  /** [1] counts the requests the reader answered itself. */
  private readerControl: Int32Array | undefined;
  private staticAnswered = 0;
  private workerRestarts = 0;
  private state: 'starting' | 'serving' | 'unmounting' | 'closed' = 'starting';
  private readonly closedD = deferred<void>();
  readonly initD = deferred<InitOut>();
  private unmounting: Promise<void> | undefined;
  private unregister: (() => void) | undefined;

  private readonly nodes = new Map<bigint, FileNode>();
  private readonly inoByHex = new Map<string, bigint>();
  private nextIno = FILE_INO_BASE;
  private readonly files = new Map<bigint, OpenFile>();
  /** FUSE passthrough: backing ids, shared with the reader thread. */
  private readonly backing: BackingIds;
  /** noOpen wanted by the options; `implicit` exists once INIT granted it. */
  private readonly noOpenWanted: boolean;
  private readonly noOpenFailedIdleMs: number | undefined;
  private implicit: ImplicitFiles | undefined;
  /** FUSE notifications being written from the threadpool; the fd is closed only after them. */
  private notifying = 0;
  private closeFdAfterNotify = -1;
  /** Reader-thread passthrough opens of readers that exited. */
  private readerPtOpens = 0;
  private readonly dirs = new Map<bigint, Dirent[]>();
  private nextFh = 1n;
  private readonly inflight = new Map<bigint, Pending>();
  private readonly sharedLookups = new Map<string, SharedLookup>();
  private readonly counters = {
    requests: 0,
    lookups: 0,
    lookupErrors: 0,
    opens: 0,
    passthroughOpens: 0,
    reads: 0,
    bytesRead: 0,
    interrupts: 0,
    forgets: 0,
    timeouts: 0,
  };
  private readonly unsupported: Record<string, number> = {};

  constructor(fd: number, mountpoint: string, opts: MountMissFsOptions) {
    this.fd = fd;
    this.mountpoint = mountpoint;
    this.provider = opts.provider;
    this.log = opts.logger.child({ component: 'missfs', mountpoint });
    this.debug = this.log.isLevelEnabled('debug');
    this.entryTimeoutMs = opts.entryTimeoutMs ?? 86_400_000;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 300_000;
    const maxWrite = opts.maxWrite ?? 128 * 1024;
    this.noOpenWanted = opts.noOpen ?? false;
    this.noOpenFailedIdleMs = opts.noOpenFailedIdleMs;
    this.backing = new BackingIds({
      enabled: !this.noOpenWanted && (opts.passthrough ?? true),
      fileInoBase: FILE_INO_BASE,
      slots: PASSTHROUGH_SLOTS,
      lingerMs: Math.max(0, opts.passthroughLingerMs ?? 300_000),
      maxBackingIds: Math.max(1, opts.maxBackingIds ?? 16_384),
      log: this.log,
      fd: () => this.fd,
      isLive: (ino) => (this.nodes.get(ino)?.nlookup ?? 0n) > 0n,
      touch: (hex) => this.provider.touch?.(`sha256:${hex}`),
    });
    this.policy = {
      maxWrite,
      maxReadahead: opts.maxReadahead ?? 1024 * 1024,
      maxPages: opts.maxPages ?? 256,
      maxBackground: opts.maxBackground ?? 64,
      congestionThreshold: Math.floor(((opts.maxBackground ?? 64) * 3) / 4),
      // No WRITEBACK_CACHE (read-only), no readdirplus, no locks, no export support.
      wantFlags:
        InitFlag.ASYNC_READ |
        InitFlag.BIG_WRITES |
        InitFlag.MAX_PAGES |
        InitFlag.PARALLEL_DIROPS |
        (this.noOpenWanted ? InitFlag.NO_OPEN_SUPPORT : 0n) |
        (this.backing.enabled ? InitFlag.PASSTHROUGH : 0n),
      // 1: this mount stays usable as an overlayfs lower layer (overlay depth 2 = the maximum).
      maxStackDepth: 1,
    };
    this.bufSize = readBufferSize(maxWrite);
    this.closed = this.closedD.promise;
    // Initial INIT failures are reported through mountMissFs; avoid unhandled rejections.
    this.initD.promise.catch(() => undefined);
  }

  // -------------------------------------------------------------------------
  // Lifecycle

  startReader(): void {
    // Until finish(): a reader blocked on /dev/fuse keeps the process from exiting (connections.ts).
    this.unregister ??= registerSession(this);
    const { worker, control } = startReaderWorker(this.fd, this.bufSize, this.staticReplies(), this.backing.table);
    this.worker = worker;
    this.readerControl = control;
    let fatal: string | undefined;
    worker.on('message', (m: ReaderMessage) => {
      if (m.t === 'req') this.onRequest(Buffer.from(m.data));
      else if (m.t === 'released') this.backing.onIdle(m.slot);
      else if (m.t === 'fatal') fatal = `${m.code}: ${m.message}`;
    });
    worker.on('error', (err) => {
      fatal = describeError(err);
    });
    worker.on('exit', () => {
      if (this.worker === worker) this.worker = undefined;
      this.staticAnswered += this.readerControl ? Atomics.load(this.readerControl, 1) : 0;
      this.readerPtOpens += this.readerControl ? Atomics.load(this.readerControl, 2) : 0;
      this.readerControl = undefined;
      if (fatal === undefined) {
        this.finish('device reported ENODEV');
        return;
      }
      this.log.error({ err: fatal }, 'missfs: device reader failed');
      if (this.state !== 'closed' && this.workerRestarts < 3) {
        this.workerRestarts++;
        this.startReader();
        return;
      }
      void this.emergencyStop(`device reader failed: ${fatal}`);
    });
  }

  /** The reader cannot be restarted: detach the mount and abort the connection so no caller hangs. */
  private async emergencyStop(reason: string): Promise<void> {
    this.log.error({ reason }, 'missfs: stopping the session');
    await runCmd('umount', ['-l', this.mountpoint], 10_000);
    if (this.connection !== undefined) await abortConnection(this.connection, this.log);
    this.finish(reason);
  }

  /** Ends the session. Called once the reader has exited (never close the fd under a blocked read). */
  private finish(reason: string): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.log.info({ reason }, 'missfs: session ended');
    for (const p of this.inflight.values()) {
      p.replied = true;
      if (p.timer) clearTimeout(p.timer);
      if (p.watch) clearInterval(p.watch);
      p.controller.abort(new GearError('Unavailable', 'miss filesystem session ended'));
    }
    this.inflight.clear();
    for (const s of this.sharedLookups.values()) s.controller.abort(new GearError('Unavailable', 'session ended'));
    this.sharedLookups.clear();
    const closing: Promise<void>[] = [];
    for (const [fh, f] of this.files) {
      this.files.delete(fh);
      closing.push(this.closeFile(f));
    }
    if (this.implicit) closing.push(this.implicit.closeAll());
    this.dirs.clear();
    this.nodes.clear();
    // The kernel drops every backing file with the connection; the ids die with the fd.
    this.backing.clear();
    if (this.notifying > 0) this.closeFdAfterNotify = this.fd;
    else closeQuietly(this.fd);
    this.fd = -1;
    this.unregister?.();
    this.initD.reject(unavailable('the FUSE session ended before INIT'));
    void Promise.allSettled(closing).then(() => this.closedD.resolve());
  }

  unmount(opts: UnmountOptions = {}): Promise<void> {
    this.unmounting ??= this.doUnmount(opts);
    return this.unmounting;
  }

  private async doUnmount(opts: UnmountOptions): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'unmounting';
    // New opens must fail like every other request that needs us: the reader stops answering them.
    // The ids stay registered; the kernel drops them with the connection.
    this.backing.stopServing();
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const ours = this.ourMount();
    if (ours) {
      let r = await runCmd('umount', [this.mountpoint], 10_000);
      if (r.code !== 0 && this.ourMount()) {
        this.log.info({ stderr: r.stderr }, 'missfs: umount failed, detaching lazily');
        r = await runCmd('umount', ['-l', this.mountpoint], 10_000);
        if (r.code !== 0 && this.ourMount()) this.log.warn({ stderr: r.stderr }, 'missfs: lazy umount failed');
      }
    }
    // Whoever still waits on us gets EIO now, so their open files are released and the mount can go.
    for (const p of [...this.inflight.values()]) {
      p.controller.abort(new GearError('Unavailable', 'miss filesystem unmounting'));
      this.fail(p, Errno.EIO);
    }
    if (await this.waitClosed(timeoutMs)) return;
    if (opts.abortOnTimeout !== false && this.connection !== undefined) {
      this.log.warn({ conn: this.connection }, 'missfs: session still referenced after umount; aborting the connection');
      if (await abortConnection(this.connection, this.log)) {
        if (await this.waitClosed(5_000)) return;
      }
    }
    throw unavailable(
      `miss filesystem at ${this.mountpoint} is still referenced (an overlay using it is still mounted?); the session goes on`,
    );
  }

  private async waitClosed(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const t = new Promise<boolean>((r) => {
      timer = setTimeout(() => r(false), ms);
    });
    const ok = await Promise.race([this.closed.then(() => true), t]);
    clearTimeout(timer);
    return ok;
  }

  /** Our mount entry at the mountpoint, if it is still attached there. */
  private ourMount(): MountLine | undefined {
    return mountsAt(this.mountpoint).find(
      (m) => m.fsType === MISSFS_FSTYPE && (this.connection === undefined || m.dev === `0:${this.connection}`),
    );
  }

  stats(): MissFsStats {
    let live = 0;
    for (const n of this.nodes.values()) if (n.nlookup > 0n) live++;
    return {
      ...this.counters,
      passthroughOpens:
        this.counters.passthroughOpens + this.readerPtOpens + (this.readerControl ? Atomics.load(this.readerControl, 2) : 0),
      staticReplies: this.staticAnswered + (this.readerControl ? Atomics.load(this.readerControl, 1) : 0),
      unsupported: { ...this.unsupported },
      liveNodes: live,
      opens: this.counters.opens + (this.implicit?.opened ?? 0),
      openFiles: this.files.size + (this.implicit?.size ?? 0),
      inflight: this.inflight.size,
      backingIds: this.backing.size,
      passthrough: this.backing.enabled && this.state !== 'closed',
      noOpen: this.implicit !== undefined && this.state !== 'closed',
    };
  }

  // -------------------------------------------------------------------------
  // Replies

  /**
   * Replies the reader thread gives without asking this thread: they must
   * equal what dispatch() would answer (the same encoders build both).
   */
  private staticReplies(): StaticReplies {
    const attr: Record<string, Uint8Array> = {};
    const entries: Record<string, Uint8Array> = {};
    const entry = (nodeid: bigint) =>
      encodeEntryOut({
        nodeid,
        generation: 0n,
        entryValidMs: this.entryTimeoutMs,
        attrValidMs: this.entryTimeoutMs,
        attr: this.dirAttr(nodeid),
      });
    for (const id of [FUSE_ROOT_ID, SHA256_NODE]) attr[String(id)] = encodeAttrOut(this.entryTimeoutMs, this.dirAttr(id));
    entries[`${FUSE_ROOT_ID}/sha256`] = entry(SHA256_NODE);
    for (let v = 0; v < 256; v++) {
      const id = PREFIX_NODE_BASE + BigInt(v);
      attr[String(id)] = encodeAttrOut(this.entryTimeoutMs, this.dirAttr(id));
      entries[`${SHA256_NODE}/${v.toString(16).padStart(2, '0')}`] = entry(id);
    }
    return { statfs: this.statfsOut(), attr, entries, staticParents: [String(FUSE_ROOT_ID), String(SHA256_NODE)] };
  }

  private statfsOut(): Buffer {
    return encodeStatfsOut({ blocks: 0, bfree: 0, bavail: 0, files: 0, ffree: 0, bsize: 4096, namelen: 255, frsize: 4096 });
  }

  /** One reply = one write. False when the kernel no longer wants it (interrupted, or session gone). */
  private write(buf: Buffer): boolean {
    if (this.fd < 0) return false;
    try {
      const n = writeSync(this.fd, buf);
      if (n !== buf.length) this.log.error({ wrote: n, len: buf.length }, 'missfs: short write of a reply');
      return true;
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'ENOENT') {
        if (this.debug) this.log.debug('missfs: reply to a request the kernel dropped (interrupted)');
      } else if (code !== 'ENODEV' && code !== 'EBADF') {
        this.log.error({ err: describeError(err) }, 'missfs: writing a reply failed');
      }
      return false;
    }
  }

  private begin(h: InHeader): Pending {
    const p: Pending = {
      unique: h.unique,
      opcode: h.opcode,
      pid: h.pid,
      replied: false,
      controller: new AbortController(),
    };
    return p;
  }

  /** Registers p as in flight (interruptible, bounded by the request timeout). */
  private track(p: Pending): void {
    this.inflight.set(p.unique, p);
    p.timer = setTimeout(() => {
      if (p.replied) return;
      this.counters.timeouts++;
      this.log.warn({ op: opName(p.opcode), unique: String(p.unique) }, 'missfs: request timed out');
      p.controller.abort(new GearError('DeadlineExceeded', 'miss filesystem request timed out'));
      this.fail(p, Errno.EIO);
    }, this.requestTimeoutMs);
    p.timer.unref();
  }

  private settle(p: Pending): boolean {
    if (p.replied) return false;
    p.replied = true;
    if (p.timer) clearTimeout(p.timer);
    if (p.watch) clearInterval(p.watch);
    this.inflight.delete(p.unique);
    return true;
  }

  private ok(p: Pending, payload?: Buffer): boolean {
    if (!this.settle(p)) return false;
    return this.write(encodeReply(p.unique, payload));
  }

  /** A reply already assembled in place (header at buf[0..16)). */
  private okRaw(p: Pending, buf: Buffer): boolean {
    if (!this.settle(p)) return false;
    return this.write(buf);
  }

  private fail(p: Pending, errno: number): boolean {
    if (!this.settle(p)) return false;
    return this.write(encodeError(p.unique, errno));
  }

  // -------------------------------------------------------------------------
  // Dispatch

  private onRequest(buf: Buffer): void {
    if (this.state === 'closed') return;
    this.counters.requests++;
    let req;
    try {
      req = parseRequest(buf);
    } catch (err) {
      this.log.error({ err: describeError(err), bytes: buf.length }, 'missfs: malformed request');
      const unique = peekUnique(buf);
      const opcode = buf.length >= 8 ? buf.readUInt32LE(4) : 0;
      if (unique !== null && !isNoReplyOp(opcode)) this.write(encodeError(unique, Errno.EIO));
      return;
    }
    const { header: h, body } = req;
    if (this.debug) {
      this.log.debug({ op: opName(h.opcode), unique: String(h.unique), nodeid: String(h.nodeid) }, 'missfs: request');
    }
    const p = this.begin(h);
    try {
      this.dispatch(p, h, body);
    } catch (err) {
      if (isNoReplyOp(h.opcode)) {
        this.log.warn({ op: opName(h.opcode), err: describeError(err) }, 'missfs: bad request');
        return;
      }
      const errno = err instanceof FuseProtocolError ? err.errno : Errno.EIO;
      if (!(err instanceof FuseProtocolError)) {
        this.log.error({ op: opName(h.opcode), err: describeError(err) }, 'missfs: request handler failed');
      } else {
        this.log.warn({ op: opName(h.opcode), err: err.message }, 'missfs: bad request');
      }
      this.fail(p, errno);
    }
  }

  private dispatch(p: Pending, h: InHeader, body: Buffer): void {
    if (h.opcode === Op.INIT) return this.onInit(p, body);
    if (this.state === 'starting') {
      // The kernel sends nothing before INIT is answered.
      if (!isNoReplyOp(h.opcode)) this.fail(p, Errno.EIO);
      return;
    }
    switch (h.opcode) {
      case Op.LOOKUP:
        return this.onLookup(p, h.nodeid, parseName(body));
      case Op.FORGET:
        return this.forget(h.nodeid, parseForgetIn(body).nlookup);
      case Op.BATCH_FORGET: {
        const { entries, truncated } = parseBatchForgetIn(body);
        if (truncated) this.log.warn('missfs: BATCH_FORGET claims more entries than it carries');
        for (const e of entries) this.forget(e.nodeid, e.nlookup);
        return;
      }
      case Op.GETATTR: {
        const attr = this.attrOf(h.nodeid);
        if (!attr) return void this.fail(p, Errno.ENOENT);
        return void this.ok(p, encodeAttrOut(this.entryTimeoutMs, attr));
      }
      case Op.OPEN:
        return this.onOpen(p, h.nodeid, parseOpenIn(body).flags);
      case Op.READ:
        return this.onRead(p, h.nodeid, body);
      case Op.RELEASE:
        return this.onRelease(p, parseReleaseIn(body).fh);
      case Op.FLUSH:
        // Without OPEN there is no FOPEN_NOFLUSH: ENOSYS once, and the kernel stops sending FLUSH.
        return void (this.implicit ? this.fail(p, Errno.ENOSYS) : this.ok(p));
      case Op.FSYNC:
      case Op.FSYNCDIR:
        return void this.ok(p);
      case Op.STATFS:
        return void this.ok(p, this.statfsOut());
      case Op.GETXATTR:
        parseGetxattrIn(body, true);
        // Never ENOSYS: overlayfs reads xattrs of its layers, and ENOSYS would be sticky.
        return void this.fail(p, Errno.ENODATA);
      case Op.LISTXATTR: {
        const { size } = parseGetxattrIn(body, false);
        return void this.ok(p, size === 0 ? encodeGetxattrOut(0) : undefined);
      }
      case Op.ACCESS: {
        const { mask } = parseAccessIn(body);
        if (!this.attrOf(h.nodeid)) return void this.fail(p, Errno.ENOENT);
        return void ((mask & W_OK) !== 0 ? this.fail(p, Errno.EROFS) : this.ok(p));
      }
      case Op.OPENDIR:
        return this.onOpendir(p, h.nodeid);
      case Op.READDIR:
        return this.onReaddir(p, h.nodeid, body);
      case Op.RELEASEDIR:
        this.dirs.delete(parseReleaseIn(body).fh);
        return void this.ok(p);
      case Op.INTERRUPT:
        return this.onInterrupt(parseInterruptIn(body).unique);
      case Op.DESTROY:
        return void this.ok(p);
      case Op.READLINK:
        return void this.fail(p, Errno.EINVAL);
      default:
        if (WRITE_OPS.has(h.opcode)) return void this.fail(p, Errno.EROFS);
        if (isNoReplyOp(h.opcode)) return;
        this.unsupported[opName(h.opcode)] = (this.unsupported[opName(h.opcode)] ?? 0) + 1;
        return void this.fail(p, Errno.ENOSYS);
    }
  }

  private onInit(p: Pending, body: Buffer): void {
    const initIn = parseInitIn(body);
    const r = negotiateInit(initIn, this.policy);
    if (!r.ok) {
      this.log.error({ reason: r.reason }, 'missfs: INIT refused');
      this.fail(p, r.errno);
      this.initD.reject(unavailable(r.reason));
      return;
    }
    this.ok(p, encodeInitOut(r.out, r.size));
    if (r.out.major !== initIn.major) return; // the kernel may retry with our major
    this.init = r.out;
    this.backing.negotiated((r.out.flags & InitFlag.PASSTHROUGH) !== 0n);
    if (this.noOpenWanted && (r.out.flags & InitFlag.NO_OPEN_SUPPORT) !== 0n && !this.implicit) {
      this.implicit = new ImplicitFiles({
        open: (hex, signal) => this.provider.open(`sha256:${hex}`, signal),
        close: (ino, hex, file) => this.closeImplicit(ino, hex, file),
        ...(this.noOpenFailedIdleMs !== undefined ? { failedIdleMs: this.noOpenFailedIdleMs } : {}),
      });
    }
    if (this.state === 'starting') this.state = 'serving';
    this.log.info(
      {
        kernel: `${initIn.major}.${initIn.minor}`,
        minor: r.out.minor,
        flags: '0x' + r.out.flags.toString(16),
        maxPages: r.out.maxPages,
        maxReadahead: r.out.maxReadahead,
        passthrough: this.backing.enabled,
        noOpen: this.implicit !== undefined,
      },
      'missfs: INIT negotiated',
    );
    this.initD.resolve(r.out);
  }

  // -------------------------------------------------------------------------
  // Nodes

  private dirAttr(ino: bigint): Attr {
    const t = this.mountTime;
    return { ino, size: 0, blocks: 0, atime: t, mtime: t, ctime: t, mode: S_IFDIR | 0o555, nlink: 2, uid: 0, gid: 0 };
  }

  private fileAttr(n: FileNode): Attr {
    const t = this.mountTime;
    return { ino: n.ino, size: n.size, atime: t, mtime: t, ctime: t, mode: S_IFREG | 0o444, nlink: 1, uid: 0, gid: 0 };
  }

  /** "root" | "sha256" | the 2-hex prefix of a prefix directory | a file node | undefined. */
  private kindOf(nodeid: bigint): 'root' | 'sha256' | string | FileNode | undefined {
    if (nodeid === FUSE_ROOT_ID) return 'root';
    if (nodeid === SHA256_NODE) return 'sha256';
    if (nodeid >= PREFIX_NODE_BASE && nodeid < PREFIX_NODE_BASE + 256n) {
      return Number(nodeid - PREFIX_NODE_BASE)
        .toString(16)
        .padStart(2, '0');
    }
    return this.nodes.get(nodeid);
  }

  private attrOf(nodeid: bigint): Attr | undefined {
    const k = this.kindOf(nodeid);
    if (k === undefined) return undefined;
    if (typeof k === 'string') return this.dirAttr(nodeid);
    return this.fileAttr(k);
  }

  private inoFor(hex: string): bigint {
    let ino = this.inoByHex.get(hex);
    if (ino === undefined) {
      ino = this.nextIno++;
      this.inoByHex.set(hex, ino);
    }
    return ino;
  }

  dropBacking(hex: string): boolean {
    const ino = this.inoByHex.get(hex);
    if (this.implicit) {
      // The kernel may hold pages read from the removed copy: drop them, and the open file.
      if (ino !== undefined) {
        this.implicit.drop(ino);
        this.invalidateInode(ino);
      }
      return true;
    }
    return ino === undefined || this.backing.drop(ino);
  }

  dropUnverified(hex: string): void {
    const ino = this.inoByHex.get(hex);
    if (this.implicit && ino !== undefined) this.invalidateInode(ino);
  }

  private forget(nodeid: bigint, nlookup: bigint): void {
    this.counters.forgets++;
    const n = this.nodes.get(nodeid);
    if (!n) return; // static directories are never freed
    n.nlookup -= nlookup;
    if (n.nlookup <= 0n) {
      this.nodes.delete(nodeid);
      this.implicit?.drop(nodeid);
      // Still open (RELEASE may come after FORGET): retired when the last one is released.
      this.backing.forgotten(nodeid);
    }
  }

  private dirEntry(p: Pending, nodeid: bigint): void {
    this.ok(
      p,
      encodeEntryOut({
        nodeid,
        generation: 0n,
        entryValidMs: this.entryTimeoutMs,
        attrValidMs: this.entryTimeoutMs,
        attr: this.dirAttr(nodeid),
      }),
    );
  }

  private onLookup(p: Pending, parent: bigint, name: string): void {
    const k = this.kindOf(parent);
    if (k === 'root') {
      // ENOENT replies are not cached by the kernel (no negative entry timeout).
      return void (name === 'sha256' ? this.dirEntry(p, SHA256_NODE) : this.fail(p, Errno.ENOENT));
    }
    if (k === 'sha256') {
      return void (HEX2.test(name)
        ? this.dirEntry(p, PREFIX_NODE_BASE + BigInt(parseInt(name, 16)))
        : this.fail(p, Errno.ENOENT));
    }
    if (typeof k === 'string') {
      if (!HEX64.test(name) || !name.startsWith(k)) return void this.fail(p, Errno.ENOENT);
      if (this.state !== 'serving') return void this.fail(p, Errno.EIO);
      this.track(p);
      void this.lookupFile(p, name);
      return;
    }
    this.fail(p, k === undefined ? Errno.ENOENT : Errno.ENOTDIR);
  }

  private async lookupFile(p: Pending, hex: string): Promise<void> {
    this.counters.lookups++;
    let size: number;
    try {
      // The kernel still holds this node (it may look a name up again while it keeps the inode,
      // e.g. after reclaiming only the dentry): its size is known, and open() fetches again if
      // the blob was evicted meanwhile, so the provider need not be asked twice.
      const known = this.nodes.get(this.inoFor(hex));
      if (!known || known.nlookup <= 0n) this.provider.noteCaller?.(`sha256:${hex}`, p.pid);
      ({ size } = known && known.nlookup > 0n ? known : await this.sharedLookup(hex, p.controller.signal));
      if (!Number.isSafeInteger(size) || size < 0) throw internal(`provider returned an invalid size ${String(size)}`);
    } catch (err) {
      if (p.replied) return; // interrupted or timed out: already answered
      this.counters.lookupErrors++;
      const errno = errnoFor(err);
      this.log.warn({ digest: `sha256:${hex}`, errno, err: describeError(err) }, 'missfs: lookup failed');
      this.fail(p, errno);
      return;
    }
    const ino = this.inoFor(hex);
    let node = this.nodes.get(ino);
    if (!node) {
      node = { ino, hex, size, nlookup: 0n };
      this.nodes.set(ino, node);
    } else if (node.size !== size) {
      this.log.warn({ digest: `sha256:${hex}`, was: node.size, now: size }, 'missfs: provider changed the size of a blob');
      node.size = size;
    }
    const sent = this.ok(
      p,
      encodeEntryOut({
        nodeid: ino,
        generation: 0n,
        entryValidMs: this.entryTimeoutMs,
        attrValidMs: this.entryTimeoutMs,
        attr: this.fileAttr(node),
      }),
    );
    // The kernel holds a reference only when it accepted the reply.
    if (sent) node.nlookup++;
    else if (node.nlookup === 0n) this.nodes.delete(ino);
  }

  /** One provider lookup per digest at a time; aborted only when every waiter is gone. */
  private sharedLookup(hex: string, signal: AbortSignal): Promise<{ size: number }> {
    let s = this.sharedLookups.get(hex);
    if (!s) {
      const controller = new AbortController();
      const promise = Promise.resolve().then(() => this.provider.lookup(`sha256:${hex}`, controller.signal));
      const entry: SharedLookup = { controller, promise, waiters: 0 };
      promise.then(
        () => this.sharedLookups.get(hex) === entry && this.sharedLookups.delete(hex),
        () => this.sharedLookups.get(hex) === entry && this.sharedLookups.delete(hex),
      );
      this.sharedLookups.set(hex, entry);
      s = entry;
    }
    const shared = s;
    shared.waiters++;
    return new Promise((resolve, reject) => {
      let done = false;
      const onAbort = () => {
        if (done) return;
        done = true;
        shared.waiters--;
        if (shared.waiters <= 0) {
          if (this.sharedLookups.get(hex) === shared) this.sharedLookups.delete(hex);
          shared.controller.abort(signal.reason);
        }
        reject(signal.reason);
      };
      if (signal.aborted) return onAbort();
      signal.addEventListener('abort', onAbort, { once: true });
      shared.promise.then(
        (v) => {
          if (done) return;
          done = true;
          signal.removeEventListener('abort', onAbort);
          shared.waiters--;
          resolve(v);
        },
        (e) => {
          if (done) return;
          done = true;
          signal.removeEventListener('abort', onAbort);
          shared.waiters--;
          reject(e);
        },
      );
    });
  }

  // -------------------------------------------------------------------------
  // Files

  private onOpen(p: Pending, nodeid: bigint, flags: number): void {
    const k = this.kindOf(nodeid);
    if (k === undefined) return void this.fail(p, Errno.ENOENT);
    if (typeof k === 'string') return void this.fail(p, Errno.EISDIR);
    if ((flags & O_ACCMODE) !== 0) return void this.fail(p, Errno.EROFS);
    if (this.state !== 'serving') return void this.fail(p, Errno.EIO);
    // The first OPEN after INIT granted NO_OPEN_SUPPORT: ENOSYS makes this open and every later one
    // succeed in the kernel without asking us (READs then come with fh 0).
    if (this.implicit) return void this.fail(p, Errno.ENOSYS);
    this.track(p);
    void this.openFile(p, k);
  }

  private async openFile(p: Pending, node: FileNode): Promise<void> {
    this.counters.opens++;
    let file: MissFile;
    try {
      file = await this.provider.open(`sha256:${node.hex}`, p.controller.signal);
    } catch (err) {
      if (p.replied) return;
      const errno = errnoFor(err);
      this.log.warn({ digest: `sha256:${node.hex}`, errno, err: describeError(err) }, 'missfs: open failed');
      this.fail(p, errno);
      return;
    }
    if (p.replied || this.state === 'closed') {
      await this.closeFile({ file, hex: node.hex, reads: new Set(), ino: node.ino, slot: -1 });
      return;
    }
    const fh = this.nextFh++;
    // Decided and counted synchronously right before the reply: the mode of the other opens of this inode matters.
    const { backingId, slot } = this.backing.startIo(node.ino, node.hex, file);
    const of: OpenFile = { file, hex: node.hex, reads: new Set(), ino: node.ino, slot };
    this.files.set(fh, of);
    // Content is immutable: keep the page cache across opens (unless the provider's bytes may be
    // unverified, see MissFile.keepCache); nothing to flush on close. The kernel fails a passthrough
    // open that has flags outside FOPEN_PASSTHROUGH_MASK (KEEP_CACHE among them): its I/O uses the
    // backing file's page cache instead.
    const flags = backingId > 0 ? FOpen.PASSTHROUGH | FOpen.NOFLUSH : (file.keepCache === false ? 0 : FOpen.KEEP_CACHE) | FOpen.NOFLUSH;
    if (!this.ok(p, encodeOpenOut(fh, flags, backingId))) {
      // The open was interrupted: the kernel will never RELEASE this handle.
      this.files.delete(fh);
      this.backing.endIo(of.ino, of.slot);
      await this.closeFile(of);
      return;
    }
    if (backingId > 0) this.counters.passthroughOpens++;
  }

  private onRead(p: Pending, nodeid: bigint, body: Buffer): void {
    const r = parseReadIn(body);
    const of = this.files.get(r.fh);
    const implicit = of === undefined && r.fh === 0n && this.implicit ? this.nodes.get(nodeid) : undefined;
    if (!of && !implicit) return void this.fail(p, Errno.EBADF);
    if (r.size > MAX_READ_BYTES) return void this.fail(p, Errno.EINVAL);
    if (this.state !== 'serving') return void this.fail(p, Errno.EIO);
    this.counters.reads++;
    this.track(p);
    if (implicit) return this.readImplicit(p, implicit, r.offset, r.size);
    const job = this.readFile(p, of!.file, of!.hex, r.offset, r.size).then(() => undefined);
    of!.reads.add(job);
    void job.finally(() => of!.reads.delete(job));
  }

  /** A READ without OPEN (noOpen): the node's file comes from ImplicitFiles. */
  private readImplicit(p: Pending, node: FileNode, offset: number, size: number): void {
    const implicit = this.implicit!;
    implicit
      .use(node.ino, node.hex, p.controller.signal, async (file) => {
        // A failed read drops the file, so the next READ opens it again.
        if (!(await this.readFile(p, file, node.hex, offset, size))) throw internal('read failed');
      })
      .catch((err: unknown) => {
        if (p.replied) return;
        const errno = errnoFor(err);
        this.log.warn({ digest: `sha256:${node.hex}`, errno, err: describeError(err) }, 'missfs: open for a read failed');
        this.fail(p, errno);
      });
  }

  /** Serves one READ from file; false when it failed (answered EIO) or was already answered. */
  private async readFile(p: Pending, file: MissFile, hex: string, offset: number, size: number): Promise<boolean> {
    const out = Buffer.allocUnsafe(16 + size);
    let got = 0;
    try {
      // Fill the request: a short reply means end of file to the kernel. Each round makes progress or ends.
      while (got < size && !p.replied) {
        const n = await file.read(out.subarray(16 + got, 16 + size), offset + got, p.controller.signal);
        if (n === 0) break;
        if (!Number.isInteger(n) || n < 0 || n > size - got) throw internal(`provider read returned ${String(n)}`);
        got += n;
      }
    } catch (err) {
      if (p.replied) return false;
      this.log.warn({ digest: `sha256:${hex}`, offset, size, err: describeError(err) }, 'missfs: read failed');
      this.fail(p, Errno.EIO);
      return false;
    }
    writeOutHeader(out, 16 + got, 0, p.unique);
    if (!this.okRaw(p, out.subarray(0, 16 + got))) return false;
    this.counters.bytesRead += got;
    return true;
  }

  private onRelease(p: Pending, fh: bigint): void {
    const of = this.files.get(fh);
    this.files.delete(fh);
    this.ok(p);
    if (of) {
      this.backing.endIo(of.ino, of.slot);
      void this.closeFile(of);
    }
  }

  private async closeFile(of: OpenFile): Promise<void> {
    await Promise.allSettled([...of.reads]);
    await this.closeMissFile(of.hex, of.file);
  }

  private async closeMissFile(hex: string, file: MissFile): Promise<void> {
    try {
      await file.close();
    } catch (err) {
      this.log.warn({ digest: `sha256:${hex}`, err: describeError(err) }, 'missfs: closing a provider file failed');
    }
  }

  /** An ImplicitFiles file is done: pages it served unverified (keepCache false) must not outlive it. */
  private async closeImplicit(ino: bigint, hex: string, file: MissFile): Promise<void> {
    if (file.keepCache === false) this.invalidateInode(ino);
    await this.closeMissFile(hex, file);
  }

  /**
   * Drops the kernel's cached pages of ino (FUSE_NOTIFY_INVAL_INODE). Written
   * from the threadpool, never from this thread: the kernel waits for pages
   * locked by READs in flight, which only this thread answers.
   */
  private invalidateInode(ino: bigint): void {
    const fd = this.fd;
    if (fd < 0) return;
    this.notifying++;
    write(fd, encodeNotifyInvalInode(ino), (err) => {
      // ENOENT: the kernel holds no such inode (nothing cached); ENODEV: the session ended.
      if (err && err.code !== 'ENOENT' && err.code !== 'ENODEV') {
        this.log.warn({ ino: String(ino), err: describeError(err) }, 'missfs: cache invalidation failed');
      }
      if (--this.notifying === 0 && this.closeFdAfterNotify >= 0) {
        closeQuietly(this.closeFdAfterNotify);
        this.closeFdAfterNotify = -1;
      }
    });
  }

  // -------------------------------------------------------------------------
  // Directories

  private listing(nodeid: bigint, k: string): Dirent[] {
    const DT_DIR = direntType(S_IFDIR);
    const DT_REG = direntType(S_IFREG);
    const parent = k === 'root' ? FUSE_ROOT_ID : k === 'sha256' ? FUSE_ROOT_ID : SHA256_NODE;
    const out: Dirent[] = [
      { ino: nodeid, name: '.', type: DT_DIR },
      { ino: parent, name: '..', type: DT_DIR },
    ];
    if (k === 'root') {
      out.push({ ino: SHA256_NODE, name: 'sha256', type: DT_DIR });
    } else if (k === 'sha256') {
      // Only prefixes with files the kernel currently knows: cheap, and never fetches anything.
      const prefixes = new Set<string>();
      for (const n of this.nodes.values()) if (n.nlookup > 0n) prefixes.add(n.hex.slice(0, 2));
      for (const pre of [...prefixes].sort()) {
        out.push({ ino: PREFIX_NODE_BASE + BigInt(parseInt(pre, 16)), name: pre, type: DT_DIR });
      }
    } else {
      const names: FileNode[] = [];
      for (const n of this.nodes.values()) if (n.nlookup > 0n && n.hex.startsWith(k)) names.push(n);
      names.sort((a, b) => (a.hex < b.hex ? -1 : 1));
      for (const n of names) out.push({ ino: n.ino, name: n.hex, type: DT_REG });
    }
    return out;
  }

  private onOpendir(p: Pending, nodeid: bigint): void {
    const k = this.kindOf(nodeid);
    if (k === undefined) return void this.fail(p, Errno.ENOENT);
    if (typeof k !== 'string') return void this.fail(p, Errno.ENOTDIR);
    // A snapshot per open directory keeps READDIR cookies stable across calls.
    const fh = this.nextFh++;
    this.dirs.set(fh, this.listing(nodeid, k));
    if (!this.ok(p, encodeOpenOut(fh, 0))) this.dirs.delete(fh);
  }

  private onReaddir(p: Pending, nodeid: bigint, body: Buffer): void {
    const r = parseReadIn(body);
    let entries = this.dirs.get(r.fh);
    if (!entries) {
      const k = this.kindOf(nodeid);
      if (typeof k !== 'string') return void this.fail(p, k === undefined ? Errno.ENOENT : Errno.ENOTDIR);
      entries = this.listing(nodeid, k);
    }
    const size = Math.min(r.size, MAX_READ_BYTES);
    this.ok(p, encodeDirents(entries, Math.min(r.offset, entries.length), size));
  }

  // -------------------------------------------------------------------------
  // Interrupts

  /**
   * The kernel sends INTERRUPT when the caller got a signal while waiting.
   * Only a dying caller (fatal signal, or gone) gets its request aborted and
   * answered EINTR: a handled, non-fatal signal (SIGURG of the Go runtime,
   * SIGCHLD, timers…) must not make open(2) fail with EINTR or throw away a
   * fetch in progress — the kernel keeps waiting for the real answer then.
   * Such a caller is watched until its request ends, in case it is killed
   * later (the kernel sends only one INTERRUPT per request).
   */
  private onInterrupt(unique: bigint): void {
    this.counters.interrupts++;
    const target = this.inflight.get(unique);
    if (!target || target.replied) return; // already answered: nothing to do
    // pid 0: the caller lives in a pid namespace this process cannot see
    // (the managed plugin runs in its own). Its state is unknowable, so the
    // request goes on; the request timeout and the fetch deadline bound it.
    if (target.pid === 0) return;
    if (callerDying(target.pid)) {
      this.abortInterrupted(target);
      return;
    }
    if (this.debug) {
      this.log.debug({ op: opName(target.opcode), pid: target.pid }, 'missfs: interrupt for a live caller; request goes on');
    }
    target.watch ??= setInterval(() => {
      if (target.replied) return;
      if (callerDying(target.pid)) this.abortInterrupted(target);
    }, 250);
    target.watch.unref();
  }

  private abortInterrupted(target: Pending): void {
    this.log.info({ op: opName(target.opcode), pid: target.pid }, 'missfs: request interrupted (caller killed)');
    target.controller.abort(new InterruptedError());
    this.fail(target, Errno.EINTR);
  }
}

const SIGKILL_BIT = 1n << 8n;

/** True when process pid is gone, exiting, or has SIGKILL pending (so its FUSE request should be abandoned). */
function callerDying(pid: number): boolean {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return true;
  }
  const field = (name: string) => new RegExp(`^${name}:\\s*(\\S+)`, 'm').exec(status)?.[1];
  const state = field('State');
  if (state === 'Z' || state === 'X') return true;
  for (const name of ['SigPnd', 'ShdPnd']) {
    const v = field(name);
    if (v && /^[0-9a-f]+$/i.test(v) && (BigInt('0x' + v) & SIGKILL_BIT) !== 0n) return true;
  }
  return false;
}

/**
 * Mounts the miss filesystem at opts.mountpoint and serves it until unmounted.
 * Resolves once the kernel's INIT has been answered (the mount is usable).
 * A stale fuse.gear mount at the mountpoint (crashed daemon) is replaced.
 */
export async function mountMissFs(opts: MountMissFsOptions): Promise<MissFsMount> {
  const mp = path.resolve(opts.mountpoint);
  const log = opts.logger;
  const mountTimeoutMs = opts.mountTimeoutMs ?? 30_000;
  await prepareMountpoint(mp, log);

  let fd: number;
  try {
    fd = openSync('/dev/fuse', 'r+');
  } catch (err) {
    throw failedPrecondition(`cannot open /dev/fuse: ${describeError(err)}`, err);
  }
  const session = new MissFsSession(fd, mp, opts);

  // mount(2) returns without waiting for INIT, so the reader starts afterwards
  // (reading an unmounted /dev/fuse fd fails with EPERM).
  const r = await runCmd(
    'mount',
    ['-i', '-t', MISSFS_FSTYPE, '-o', MISSFS_MOUNT_OPTIONS, MISSFS_SOURCE, mp],
    mountTimeoutMs,
    fd,
  );
  if (r.code !== 0) {
    closeSync(fd);
    throw failedPrecondition(
      `mounting the miss filesystem at ${mp} failed${r.timedOut ? ' (timed out)' : ''}: ${r.stderr || `exit ${r.code}`}`,
    );
  }
  const mine = mountsAt(mp)
    .filter((m) => m.fsType === MISSFS_FSTYPE)
    .at(-1);
  const minor = mine ? /^0:(\d+)$/.exec(mine.dev)?.[1] : undefined;
  session.connection = minor !== undefined ? Number(minor) : undefined;

  session.startReader();
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      session.initD.promise,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(unavailable(`no FUSE INIT from the kernel within ${mountTimeoutMs} ms`)), mountTimeoutMs);
      }),
    ]);
  } catch (err) {
    log.error({ err: describeError(err) }, 'missfs: mount did not come up');
    await session.unmount({ timeoutMs: 5_000 }).catch(() => undefined);
    throw err;
  } finally {
    clearTimeout(timer);
  }
  log.info({ mountpoint: mp, conn: session.connection }, 'missfs: mounted');
  return session;
}
