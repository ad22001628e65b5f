/**
 * The /dev/fuse reader: a worker thread that blocks in read(2) so that neither
 * the event loop nor the libuv threadpool ever does.
 *
 * One read returns exactly one request. Requests with a fixed answer that
 * needs no state of the main thread (STATFS, GETATTR and LOOKUP of the static
 * directories /, /sha256, /sha256/ab, GETXATTR → ENODATA, LISTXATTR → empty)
 * are answered here, from reply payloads the main thread prepared; everything
 * else is copied into a fresh ArrayBuffer and transferred to the main thread,
 * which serves it and replies (one writeSync per reply, from either thread).
 *
 * Answering those here matters: overlayfs STATFSes every layer while it
 * mounts (ovl_check_namelen), so a daemon that calls mount(2) synchronously
 * on its main thread for an overlay with the miss filesystem as a layer would
 * otherwise wait on itself forever.
 *
 * The worker body is a small self-contained plain-JS string run with
 * `eval: true`: it then works the same from dist/ (compiled) and under vitest
 * (TypeScript sources, where no .js file sits next to this module), and needs
 * no loader.
 *
 * With FUSE passthrough it also answers OPEN of a file whose backing id the
 * main thread has published in the shared passthrough table, and the RELEASE
 * of such opens: a warm open then costs one device round trip, never the main
 * thread (see PassthroughTable).
 *
 * The worker ends on its own when the read fails with ENODEV (the filesystem
 * was unmounted or the connection aborted). It cannot be stopped while it is
 * blocked in read(2) — Worker.terminate() does not interrupt a system call,
 * and even process.exit() waits for it — so the owner must end the mount
 * (umount, or abort the connection) to stop it. A process that must exit
 * aborts every connection first (connections.ts, cli/service.ts).
 */
import { Worker } from 'node:worker_threads';

/** Messages from the reader to the main thread. */
export type ReaderMessage =
  | { t: 'req'; data: ArrayBuffer }
  /** The last open of a slot answered by the reader was released (its backing id may be retired). */
  | { t: 'released'; slot: number }
  /** The device reported ENODEV: the session is over. */
  | { t: 'end' }
  /** An unexpected read error; the worker has stopped reading. */
  | { t: 'fatal'; code: string; message: string };

/** Reply payloads (without the out header) for requests the reader answers itself. */
export interface StaticReplies {
  /** fuse_kstatfs for STATFS. */
  statfs: Uint8Array;
  /** fuse_attr_out for GETATTR, by nodeid (decimal string) of static directories. */
  attr: Record<string, Uint8Array>;
  /** fuse_entry_out for LOOKUP, by "<parent nodeid>/<name>"; parents listed in staticParents. */
  entries: Record<string, Uint8Array>;
  /** Parent nodeids (decimal strings) whose children are all in `entries` (any other name: ENOENT). */
  staticParents: string[];
}

/**
 * The passthrough table, shared by the main thread and the reader: three
 * Int32Arrays of `slots` entries over one SharedArrayBuffer, indexed by
 * slot = nodeid − fileInoBase (file nodes only, while below `slots`):
 *
 *   ids[slot]    the published backing id (0: none; the reader forwards the OPEN)
 *   opens[slot]  passthrough opens of the node not yet released, by either thread
 *   used[slot]   last open, in seconds since epochMs
 *
 * Only the main thread writes ids. The reader reserves with opens += 1 before
 * it reads ids (and undoes it when it finds 0); the main thread retires an id
 * by storing 0 and then closing it only if opens is 0 (else it publishes it
 * again). With sequentially consistent Atomics an id in use is never closed.
 */
export interface PassthroughTable {
  buffer: SharedArrayBuffer;
  slots: number;
  fileInoBase: number;
  /** Date.now() at creation: the origin of used[]. */
  epochMs: number;
}

export function passthroughViews(t: PassthroughTable): { ids: Int32Array; opens: Int32Array; used: Int32Array } {
  return {
    ids: new Int32Array(t.buffer, 0, t.slots),
    opens: new Int32Array(t.buffer, t.slots * 4, t.slots),
    used: new Int32Array(t.buffer, t.slots * 8, t.slots),
  };
}

export function newPassthroughTable(slots: number, fileInoBase: number): PassthroughTable {
  return { buffer: new SharedArrayBuffer(slots * 12), slots, fileInoBase, epochMs: Date.now() };
}

export interface ReaderWorkerData {
  fd: number;
  bufSize: number;
  /**
   * Int32Array over a SharedArrayBuffer: [0] = stop requested (checked between
   * reads), [1] = static requests answered here, [2] = passthrough OPENs
   * answered here, [3] = RELEASEs answered here.
   */
  control: SharedArrayBuffer;
  replies: StaticReplies | null;
  passthrough: PassthroughTable | null;
}

export const READER_WORKER_SOURCE = String.raw`
'use strict';
const { workerData, parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { fd, bufSize, control, replies, passthrough } = workerData;
const ctl = new Int32Array(control);
const PT_SLOTS = passthrough ? passthrough.slots : 0;
const PT_BASE = passthrough ? BigInt(passthrough.fileInoBase) : 0n;
const PT_EPOCH = passthrough ? passthrough.epochMs : 0;
const ptIds = passthrough ? new Int32Array(passthrough.buffer, 0, PT_SLOTS) : null;
const ptOpens = passthrough ? new Int32Array(passthrough.buffer, PT_SLOTS * 4, PT_SLOTS) : null;
const ptUsed = passthrough ? new Int32Array(passthrough.buffer, PT_SLOTS * 8, PT_SLOTS) : null;
// fh of opens answered here: bit 62 set, slot in the low 32 bits (main-thread fhs count up from 1).
const FH_FLAG = 1n << 62n;
const FOPEN_PASSTHROUGH_NOFLUSH = (1 << 7) | (1 << 5);
const buf = Buffer.allocUnsafe(bufSize);
const MAX_TRANSIENT = 10000;
const EMPTY = new Uint8Array(0);
const XATTR_SIZE_0 = new Uint8Array(8);
const staticParents = new Set(replies ? replies.staticParents : []);
let transient = 0;

function reply(unique, error, payload) {
  const out = Buffer.allocUnsafe(16 + payload.length);
  out.writeUInt32LE(16 + payload.length, 0);
  out.writeInt32LE(error, 4);
  out.writeBigUInt64LE(unique, 8);
  out.set(payload, 16);
  Atomics.add(ctl, 1, 1); // before the write: whoever the reply wakes already sees the count
  try { fs.writeSync(fd, out); } catch (err) { /* ENOENT: interrupted; ENODEV: the next read ends the loop */ }
}

// OPEN of a file node with a published backing id: FOPEN_PASSTHROUGH with that id. False: forward.
function openPassthrough(unique, nodeid, len) {
  if (!ptIds || len < 48 || nodeid < PT_BASE || nodeid - PT_BASE >= BigInt(PT_SLOTS)) return false;
  if ((buf.readUInt32LE(40) & 3) !== 0) return false; // O_ACCMODE: the main thread answers EROFS
  const slot = Number(nodeid - PT_BASE);
  Atomics.add(ptOpens, slot, 1); // reserve first: the main thread closes an id only while opens is 0
  const id = Atomics.load(ptIds, slot);
  if (id <= 0) {
    Atomics.sub(ptOpens, slot, 1); // the main thread answers, and counts its own
    return false;
  }
  Atomics.store(ptUsed, slot, Math.floor((Date.now() - PT_EPOCH) / 1000));
  const out = Buffer.alloc(32);
  out.writeUInt32LE(32, 0);
  out.writeBigUInt64LE(unique, 8);
  out.writeBigUInt64LE(FH_FLAG | BigInt(slot), 16);
  out.writeUInt32LE(FOPEN_PASSTHROUGH_NOFLUSH, 24);
  out.writeInt32LE(id, 28);
  Atomics.add(ctl, 2, 1);
  try {
    fs.writeSync(fd, out);
  } catch (err) {
    // ENOENT: the open was interrupted and will never be released; ENODEV: the session is over.
    Atomics.sub(ctl, 2, 1);
    if (Atomics.sub(ptOpens, slot, 1) === 1) parentPort.postMessage({ t: 'released', slot });
  }
  return true;
}

// RELEASE of an open answered here (fh flag). False: forward.
function releasePassthrough(unique, len) {
  if (!ptOpens || len < 48) return false;
  const fh = buf.readBigUInt64LE(40);
  if ((fh & FH_FLAG) === 0n) return false;
  const slot = Number(fh & 0xffffffffn);
  if ((fh >> 32n) !== (FH_FLAG >> 32n) || slot >= PT_SLOTS) return false; // not ours: the main thread answers
  Atomics.add(ctl, 3, 1);
  // Never below 0, whatever the kernel sends.
  for (;;) {
    const n = Atomics.load(ptOpens, slot);
    if (n <= 0) break;
    if (Atomics.compareExchange(ptOpens, slot, n, n - 1) === n) {
      if (n === 1) parentPort.postMessage({ t: 'released', slot });
      break;
    }
  }
  const out = Buffer.alloc(16);
  out.writeUInt32LE(16, 0);
  out.writeBigUInt64LE(unique, 8);
  try { fs.writeSync(fd, out); } catch (err) { /* as in reply() */ }
  return true;
}

// True when the request was answered here. Every field read is bounded by n and len.
function answer(n) {
  if (n < 40) return false;
  const len = buf.readUInt32LE(0);
  if (len !== n) return false;
  const op = buf.readUInt32LE(4);
  const unique = buf.readBigUInt64LE(8);
  if (op === 14) return openPassthrough(unique, buf.readBigUInt64LE(16), len); // OPEN
  if (op === 18) return releasePassthrough(unique, len); // RELEASE
  if (!replies) return false;
  const nodeid = String(buf.readBigUInt64LE(16));
  switch (op) {
    case 17: // STATFS
      reply(unique, 0, replies.statfs);
      return true;
    case 3: { // GETATTR
      const a = replies.attr[nodeid];
      if (!a) return false;
      reply(unique, 0, a);
      return true;
    }
    case 1: { // LOOKUP
      if (!staticParents.has(nodeid)) return false;
      const nul = buf.indexOf(0, 40);
      if (nul <= 40 || nul >= len) return false;
      const e = replies.entries[nodeid + '/' + buf.toString('latin1', 40, nul)];
      if (e) reply(unique, 0, e);
      else reply(unique, -2, EMPTY); // ENOENT (not cached by the kernel)
      return true;
    }
    case 22: // GETXATTR: never ENOSYS (sticky; overlayfs reads xattrs of its layers)
      reply(unique, -61, EMPTY); // ENODATA
      return true;
    case 23: { // LISTXATTR
      if (len < 48) return false;
      reply(unique, 0, buf.readUInt32LE(40) === 0 ? XATTR_SIZE_0 : EMPTY);
      return true;
    }
    default:
      return false;
  }
}

for (;;) {
  if (Atomics.load(ctl, 0) !== 0) break;
  let n;
  try {
    n = fs.readSync(fd, buf, 0, bufSize, null);
  } catch (err) {
    const code = err && err.code;
    if (code === 'ENODEV') { parentPort.postMessage({ t: 'end' }); break; }
    if (code === 'ENOENT') continue; // the request was interrupted before we got it
    if ((code === 'EINTR' || code === 'EAGAIN') && ++transient < MAX_TRANSIENT) {
      if (code === 'EAGAIN') Atomics.wait(ctl, 0, 0, 1);
      continue;
    }
    parentPort.postMessage({ t: 'fatal', code: String(code), message: String(err && err.message) });
    break;
  }
  transient = 0;
  if (n <= 0) { parentPort.postMessage({ t: 'end' }); break; }
  if (answer(n)) continue;
  const data = new ArrayBuffer(n);
  new Uint8Array(data).set(buf.subarray(0, n));
  parentPort.postMessage({ t: 'req', data }, [data]);
}
`;

/**
 * Starts the reader on an open /dev/fuse fd. Call it only once the fd is
 * mounted (before that, reads fail with EPERM). INIT always goes to the main
 * thread; `replies` (null: forward everything) serve the static requests.
 */
export function startReaderWorker(
  fd: number,
  bufSize: number,
  replies: StaticReplies | null,
  passthrough: PassthroughTable | null = null,
): { worker: Worker; control: Int32Array } {
  const control = new SharedArrayBuffer(16);
  const data: ReaderWorkerData = { fd, bufSize, control, replies, passthrough };
  const worker = new Worker(READER_WORKER_SOURCE, { eval: true, workerData: data, name: 'gear-missfs-reader' });
  return { worker, control: new Int32Array(control) };
}
