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
 * The worker ends on its own when the read fails with ENODEV (the filesystem
 * was unmounted or the connection aborted). It cannot be stopped while it is
 * blocked in read(2) — Worker.terminate() does not interrupt a system call,
 * and even process.exit() waits for it — so the owner must end the mount
 * (umount, or abort the connection) to stop it.
 */
import { Worker } from 'node:worker_threads';

/** Messages from the reader to the main thread. */
export type ReaderMessage =
  | { t: 'req'; data: ArrayBuffer }
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

export interface ReaderWorkerData {
  fd: number;
  bufSize: number;
  /** Int32Array over a SharedArrayBuffer: [0] = stop requested (checked between reads), [1] = answered here. */
  control: SharedArrayBuffer;
  replies: StaticReplies | null;
}

export const READER_WORKER_SOURCE = String.raw`
'use strict';
const { workerData, parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { fd, bufSize, control, replies } = workerData;
const ctl = new Int32Array(control);
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

// True when the request was answered here. Every field read is bounded by n and len.
function answer(n) {
  if (!replies || n < 40) return false;
  const len = buf.readUInt32LE(0);
  if (len !== n) return false;
  const op = buf.readUInt32LE(4);
  const unique = buf.readBigUInt64LE(8);
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
): { worker: Worker; control: Int32Array } {
  const control = new SharedArrayBuffer(8);
  const data: ReaderWorkerData = { fd, bufSize, control, replies };
  const worker = new Worker(READER_WORKER_SOURCE, { eval: true, workerData: data, name: 'gear-missfs-reader' });
  return { worker, control: new Int32Array(control) };
}
