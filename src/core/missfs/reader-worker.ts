/**
 * The /dev/fuse reader: a worker thread that blocks in read(2) so that neither
 * the event loop nor the libuv threadpool ever does.
 *
 * One read returns exactly one request; the worker copies it into a fresh
 * ArrayBuffer and transfers it to the main thread, which parses, serves and
 * replies (replies are written from the main thread with one writeSync each).
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

export interface ReaderWorkerData {
  fd: number;
  bufSize: number;
  /** Int32Array over a SharedArrayBuffer: [0] = stop requested (checked between reads). */
  control: SharedArrayBuffer;
}

export const READER_WORKER_SOURCE = String.raw`
'use strict';
const { workerData, parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { fd, bufSize, control } = workerData;
const ctl = new Int32Array(control);
const buf = Buffer.allocUnsafe(bufSize);
const MAX_TRANSIENT = 10000;
let transient = 0;
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
      if (code === 'EAGAIN') Atomics.wait(ctl, 1, 0, 1);
      continue;
    }
    parentPort.postMessage({ t: 'fatal', code: String(code), message: String(err && err.message) });
    break;
  }
  transient = 0;
  if (n <= 0) { parentPort.postMessage({ t: 'end' }); break; }
  const data = new ArrayBuffer(n);
  new Uint8Array(data).set(buf.subarray(0, n));
  parentPort.postMessage({ t: 'req', data }, [data]);
}
`;

/** Starts the reader on an open /dev/fuse fd (call only once the fd is mounted: before that reads fail with EPERM). */
export function startReaderWorker(fd: number, bufSize: number): { worker: Worker; control: Int32Array } {
  const control = new SharedArrayBuffer(8);
  const data: ReaderWorkerData = { fd, bufSize, control };
  const worker = new Worker(READER_WORKER_SOURCE, { eval: true, workerData: data, name: 'gear-missfs-reader' });
  return { worker, control: new Int32Array(control) };
}
