/**
 * FUSE passthrough backing ids of one miss-filesystem session (kernel ≥ 6.9
 * with CONFIG_FUSE_PASSTHROUGH).
 *
 * When the provider's file is complete (MissFile.backingFd), an OPEN registers
 * it with the kernel (FUSE_DEV_IOC_BACKING_OPEN) and is answered
 * FOPEN_PASSTHROUGH: reads, readahead and mmap of that open file then go to the
 * pool file in the kernel and never reach the server. The kernel wants every
 * concurrent open of one inode in the same mode with the same backing file, so
 * a digest with passthrough opens keeps one backing id, shared by its opens; a
 * digest with READ-mode opens stays in READ mode until they are released. The
 * id is published in a table shared with the reader thread (PassthroughTable),
 * which then answers later OPENs (and their RELEASEs) of that file by itself.
 * An id is closed after the last RELEASE once it was not used for `lingerMs`,
 * when the kernel forgets the node, or when too many are open. Without
 * passthrough (old kernel, option off, EPERM/ELOOP from the kernel) every open
 * is in READ mode.
 */
import type { Logger } from 'pino';
import { describeError, errnoCode, internal } from '../errors.js';
import { native } from '../sys/native.js';
import { newPassthroughTable, passthroughViews, type PassthroughTable } from './reader-worker.js';
import type { MissFile } from './types.js';

export interface BackingIdsOptions {
  /** Passthrough wanted (the session's option). */
  enabled: boolean;
  /** Inode number of the first file node: slot = inode − fileInoBase. */
  fileInoBase: bigint;
  /** File nodes that can use passthrough; later ones are served through READ. */
  slots: number;
  lingerMs: number;
  maxBackingIds: number;
  log: Logger;
  /** The /dev/fuse descriptor, -1 once the session ended. */
  fd: () => number;
  /** True while the kernel still holds the node (it may open it again). */
  isLive: (ino: bigint) => boolean;
  /** Records a use the provider never saw (an open answered by the reader thread). */
  touch: (hex: string) => void;
}

export class BackingIds {
  /** Shared with the reader thread; null when passthrough is off by option. */
  readonly table: PassthroughTable | null;
  private readonly pt: { ids: Int32Array; opens: Int32Array; used: Int32Array } | null;
  /** Wanted, then negotiated in INIT; off for good after EPERM/ELOOP/ENOTTY. */
  private on: boolean;
  private readonly warned = new Set<string>();
  /** Slots with a registered backing id → the file's hex and the last use reported to the provider. */
  private readonly published = new Map<number, { hex: string; reported: number }>();
  /** By inode: open files in READ mode (while there are any, no passthrough for that inode). */
  private readonly readOpens = new Map<bigint, number>();
  private timer: NodeJS.Timeout | undefined;
  private ended = false;

  constructor(private readonly o: BackingIdsOptions) {
    this.on = o.enabled;
    this.table = o.enabled ? newPassthroughTable(o.slots, Number(o.fileInoBase)) : null;
    this.pt = this.table ? passthroughViews(this.table) : null;
  }

  /** Passthrough negotiated and not switched off. */
  get enabled(): boolean {
    return this.on;
  }

  /** Backing ids registered now. */
  get size(): number {
    return this.published.size;
  }

  /** INIT answered: passthrough stays on only when the kernel granted it. */
  negotiated(granted: boolean): void {
    this.on = this.on && this.pt !== null && granted;
    if (this.on && this.o.lingerMs > 0 && !this.timer) {
      this.timer = setInterval(() => this.sweep(false), Math.max(1_000, Math.min(this.o.lingerMs / 2, 30_000)));
      this.timer.unref();
    }
  }

  /**
   * Chooses how the kernel does I/O on a new open of a node, and counts it: a
   * backing id (> 0) for FOPEN_PASSTHROUGH, or 0 for READ requests.
   *
   * The kernel fails an open with EIO when its mode conflicts with the other
   * opens of the inode (a READ-mode open while one is in passthrough, a
   * passthrough open while one is in READ mode, or a second backing file). It
   * drops its side of an open before sending RELEASE, so the counts here are
   * never below the kernel's: following them never causes a conflict.
   */
  startIo(ino: bigint, hex: string, file: MissFile): { backingId: number; slot: number } {
    const pt = this.pt;
    const slot = this.slotOf(ino);
    if (pt && slot >= 0) {
      Atomics.add(pt.opens, slot, 1);
      const id = Atomics.load(pt.ids, slot);
      if (id > 0) {
        // Same content (content-addressed), so a partial provider file may share the complete one.
        Atomics.store(pt.used, slot, this.now());
        return { backingId: id, slot };
      }
      Atomics.sub(pt.opens, slot, 1);
    }
    const fd = file.backingFd;
    const reading = this.readOpens.get(ino) ?? 0;
    const readMode = () => {
      this.readOpens.set(ino, reading + 1);
      return { backingId: 0, slot: -1 };
    };
    if (!pt || !this.on || fd === undefined || !Number.isInteger(fd) || fd < 0 || reading > 0) return readMode();
    if (slot < 0) {
      this.failed(hex, internal(`more than ${this.o.slots} files in this session`));
      return readMode();
    }
    let id: number;
    try {
      id = native.fuseBackingOpen(this.o.fd(), fd);
      if (!Number.isInteger(id) || id <= 0) throw internal(`FUSE_DEV_IOC_BACKING_OPEN returned backing id ${String(id)}`);
    } catch (err) {
      this.failed(hex, err);
      return readMode();
    }
    Atomics.add(pt.opens, slot, 1);
    Atomics.store(pt.used, slot, this.now());
    Atomics.store(pt.ids, slot, id);
    this.published.set(slot, { hex, reported: Atomics.load(pt.used, slot) });
    if (this.published.size > this.o.maxBackingIds) this.sweep(true);
    return { backingId: id, slot };
  }

  /** Undoes startIo() for an open file that is gone (RELEASE, or its open reply was not accepted). */
  endIo(ino: bigint, slot: number): void {
    if (slot < 0) {
      const n = (this.readOpens.get(ino) ?? 0) - 1;
      if (n > 0) this.readOpens.set(ino, n);
      else this.readOpens.delete(ino);
      return;
    }
    const pt = this.pt;
    if (!pt) return;
    if (Atomics.sub(pt.opens, slot, 1) === 1) this.onIdle(slot);
  }

  /** The last open of slot was released (by either thread): close its id now, or leave it for the sweep (linger). */
  onIdle(slot: unknown): void {
    if (typeof slot !== 'number' || !this.published.has(slot)) return;
    // A node the kernel forgot cannot be opened again through this inode: no point lingering.
    if (this.o.lingerMs <= 0 || !this.o.isLive(this.o.fileInoBase + BigInt(slot))) this.retire(slot);
  }

  /** The kernel forgot node ino: its id goes (when an open still uses it: when that is released). */
  forgotten(ino: bigint): void {
    const slot = this.slotOf(ino);
    if (slot >= 0 && this.published.has(slot)) this.retire(slot);
  }

  /** Closes ino's id so the next open asks the provider again; false while an open uses it. */
  drop(ino: bigint): boolean {
    const slot = this.slotOf(ino);
    return slot < 0 || !this.published.has(slot) || this.retire(slot);
  }

  /** Unmounting: the reader answers no OPEN any more (the ids stay registered; the kernel drops them with the connection). */
  stopServing(): void {
    if (this.pt) for (const slot of this.published.keys()) Atomics.store(this.pt.ids, slot, 0);
  }

  /** The session ended: the kernel dropped every backing file with the connection. */
  clear(): void {
    this.ended = true;
    this.published.clear();
    this.pt?.ids.fill(0);
    this.readOpens.clear();
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Table slot of a file inode, or -1. */
  private slotOf(ino: bigint): number {
    const slot = ino - this.o.fileInoBase;
    return slot >= 0n && slot < BigInt(this.o.slots) ? Number(slot) : -1;
  }

  private now(): number {
    return this.table ? Math.floor((Date.now() - this.table.epochMs) / 1000) : 0;
  }

  /** Closes the backing id of slot unless an open is using it (then it stays published). */
  private retire(slot: number): boolean {
    const pt = this.pt;
    if (!pt) return false;
    const id = Atomics.load(pt.ids, slot);
    if (id <= 0) {
      this.published.delete(slot);
      return true;
    }
    Atomics.store(pt.ids, slot, 0);
    if (Atomics.load(pt.opens, slot) !== 0) {
      // In use (or a reader open is reserving it right now): keep it.
      Atomics.store(pt.ids, slot, id);
      return false;
    }
    this.published.delete(slot);
    const fd = this.o.fd();
    if (fd < 0) return true; // the session ended: the kernel dropped it already
    try {
      // Open files keep their own reference to the backing file; only the id goes.
      native.fuseBackingClose(fd, id);
    } catch (err) {
      this.o.log.warn({ backingId: id, err: describeError(err) }, 'missfs: closing a passthrough backing id failed');
    }
    return true;
  }

  /** Closes idle ids unused for lingerMs; with `full`, also the oldest idle ones until well below maxBackingIds. */
  private sweep(full: boolean): void {
    const pt = this.pt;
    if (!pt || this.ended) return;
    const now = this.now();
    const lingerS = Math.ceil(this.o.lingerMs / 1000);
    const idle: number[] = [];
    for (const [slot, entry] of [...this.published]) {
      // Opens the reader answered never reached the provider: report them as uses (cache recency).
      const used = Atomics.load(pt.used, slot);
      if (used > entry.reported) {
        entry.reported = used;
        try {
          this.o.touch(entry.hex);
        } catch (err) {
          this.o.log.warn({ digest: `sha256:${entry.hex}`, err: describeError(err) }, 'missfs: provider touch failed');
        }
      }
      if (Atomics.load(pt.opens, slot) !== 0) continue;
      if (now - Atomics.load(pt.used, slot) >= lingerS) this.retire(slot);
      else idle.push(slot);
    }
    if (!full) return;
    const target = Math.floor(this.o.maxBackingIds * 0.9);
    idle.sort((a, b) => Atomics.load(pt.used, a) - Atomics.load(pt.used, b));
    for (const slot of idle) {
      if (this.published.size <= target) break;
      this.retire(slot);
    }
  }

  /** Logs (once per cause) why a file is served through READ; switches passthrough off when it cannot work at all. */
  private failed(hex: string, err: unknown): void {
    const code = errnoCode(err) ?? 'other';
    let hint: string;
    let fatal = true;
    if (code === 'EPERM') {
      hint = 'the kernel refused FUSE passthrough (the daemon needs CAP_SYS_ADMIN in the initial user namespace); run it as real root, or mount with passthrough off';
    } else if (code === 'ELOOP') {
      hint = 'the pool is on a stacked filesystem (overlayfs?) that FUSE passthrough cannot use; put the gear root on ext4 or xfs';
    } else if (code === 'ENOTTY' || code === 'EINVAL') {
      hint = 'this kernel does not support FUSE_DEV_IOC_BACKING_OPEN as expected';
    } else {
      hint = 'serving this file through READ requests';
      fatal = false;
    }
    if (fatal) this.on = false;
    if (this.warned.has(code)) return;
    this.warned.add(code);
    this.o.log.warn(
      { digest: `sha256:${hex}`, err: describeError(err), passthrough: this.on },
      `missfs: FUSE passthrough unavailable, reads go through this process (slower): ${hint}`,
    );
  }
}
