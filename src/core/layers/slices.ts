/**
 * Long synchronous builds in slices. A build written as a generator that
 * yields now and then (every few hundred items) can run at once (runSync) or
 * give the event loop a turn whenever a slice took `sliceMs` (runSliced): the
 * daemon's one thread then keeps reading the prefetch downloads' sockets and
 * answering FUSE requests and plugin calls while a pull builds its index.
 */
import { performance } from 'node:perf_hooks';
import { setImmediate as turn } from 'node:timers/promises';

/** A build step by step: yields between items, returns the result. */
export type Steps<T> = Generator<void, T, void>;

/** Runs steps to the end without yielding to the event loop. */
export function runSync<T>(steps: Steps<T>): T {
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
  }
}

/** Default slice: long enough that the turns cost little, short enough that a socket buffer does not fill. */
export const DEFAULT_SLICE_MS = 8;

/** Runs steps, letting the event loop run whenever `sliceMs` passed since the last turn. */
export async function runSliced<T>(steps: Steps<T>, sliceMs = DEFAULT_SLICE_MS): Promise<T> {
  let start = performance.now();
  for (;;) {
    const r = steps.next();
    if (r.done) return r.value;
    if (performance.now() - start >= sliceMs) {
      await turn();
      start = performance.now();
    }
  }
}
