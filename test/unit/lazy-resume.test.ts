/**
 * The crash-resume queue (src/core/lazy/resume.ts) on fakes: what it plans to
 * fetch (cached files, duplicates, the pool cap), that it keeps at most half
 * of the fetcher's slots, asks in the background, tries the next location,
 * counts failures, and stops on close. No timing: the fake fetcher completes
 * requests only when the test says so.
 */
import { describe, expect, it } from 'vitest';
import { deadlineExceeded, unavailable } from '../../src/core/errors.js';
import type { FetchOptions, FetchRequest } from '../../src/core/fetcher/fetcher.js';
import { planResume, ResumeQueue, type ResumeFile } from '../../src/core/lazy/resume.js';

const dg = (n: number) => `sha256:${n.toString(16).padStart(64, '0')}`;

interface Pending {
  req: FetchRequest;
  opts: FetchOptions | undefined;
  resolve: () => void;
  reject: (e: unknown) => void;
}

function fakes(opts: { maxParallel: number; lowWatermark: number; pooled?: Map<string, number>; locations?: number }) {
  const pooled = opts.pooled ?? new Map<string, number>();
  const pending: Pending[] = [];
  const touched: string[] = [];
  /** Digests the fake fetcher says are still downloading (a deadline hit only the waiter). */
  const inFlight = new Set<string>();
  let maxRunning = 0;
  let waiters: (() => void)[] = [];
  const changed = () => {
    const w = waiters;
    waiters = [];
    for (const f of w) f();
  };
  const deps = {
    pool: {
      has: (d: string) => pooled.has(d),
      sizeOf: (d: string) => pooled.get(d),
      touch: (d: string) => (touched.push(d), pooled.has(d)),
      stat: () => ({ lowWatermarkBytes: opts.lowWatermark }),
    },
    fetcher: {
      maxParallel: opts.maxParallel,
      inFlight: (d: string) => inFlight.has(d),
      fetch(req: FetchRequest, o?: FetchOptions): Promise<void> {
        return new Promise<void>((resolve, reject) => {
          const p: Pending = {
            req,
            opts: o,
            resolve: () => {
              pending.splice(pending.indexOf(p), 1);
              pooled.set(req.digest, req.size);
              resolve();
            },
            reject: (e) => {
              pending.splice(pending.indexOf(p), 1);
              reject(e);
            },
          };
          o?.signal?.addEventListener('abort', () => p.reject(o.signal!.reason), { once: true });
          pending.push(p);
          maxRunning = Math.max(maxRunning, pending.length);
          changed();
        });
      },
    },
    catalog: {
      requests: (digest: string): FetchRequest[] =>
        Array.from({ length: opts.locations ?? 1 }, (_, i) => ({
          digest,
          size: 1,
          location: { registry: `r${i}.example`, repository: 'app' },
        })),
    },
  };
  /** Resolves when at least n fetches are pending. */
  const pendingAtLeast = async (n: number) => {
    while (pending.length < n) await new Promise<void>((r) => waiters.push(r));
  };
  return { deps, pending, pooled, touched, inFlight, pendingAtLeast, maxRunning: () => maxRunning };
}

describe('planResume', () => {
  it('fetches the distinct uncached files, smallest first, within the budget left after the cached ones', () => {
    const files: ResumeFile[] = [
      { digest: dg(1), size: 500 },
      { digest: dg(2), size: 100 },
      { digest: dg(3), size: 300 }, // cached
      { digest: dg(2), size: 100 }, // duplicate (a second index layer)
      { digest: dg(4), size: 200 },
      { digest: dg(5), size: 50 },
    ];
    const p = planResume(files, (d) => d === dg(3), 700);
    expect(p.total).toBe(5);
    expect(p.totalBytes).toBe(1150);
    expect(p.cached).toBe(1);
    expect(p.cachedBytes).toBe(300);
    // 700 - 300 cached = 400 of room: 50 + 100 + 200 fit, 500 does not
    expect(p.todo.map((f) => f.digest)).toEqual([dg(5), dg(2), dg(4)]);
    expect(p.todoBytes).toBe(350);
    expect(p.skipped).toBe(1);
    expect(p.skippedBytes).toBe(500);
  });

  it('fetches nothing when the cached files already fill the budget', () => {
    const p = planResume([{ digest: dg(1), size: 10 }, { digest: dg(2), size: 10 }], (d) => d === dg(1), 5);
    expect(p.todo).toEqual([]);
    expect(p.skipped).toBe(1);
  });
});

describe('ResumeQueue', () => {
  it('uses at most half of the fetcher slots, asks in the background, and reports progress', async () => {
    const pooled = new Map([[dg(100), 7]]);
    const f = fakes({ maxParallel: 8, lowWatermark: 1_000_000, pooled });
    const q = new ResumeQueue(f.deps);
    expect(q.window).toBe(4);
    const files = [{ digest: dg(100), size: 7 }, ...Array.from({ length: 10 }, (_, i) => ({ digest: dg(i + 1), size: 10 + i }))];
    const done = q.start(files, 2);
    expect(f.touched).toEqual([dg(100)]); // cached files of running containers made most recent
    await f.pendingAtLeast(4);
    expect(f.pending).toHaveLength(4);
    expect(f.pending.every((p) => p.opts?.priority === 'background')).toBe(true);
    expect(q.status()).toMatch(/^1 of 11 files in the pool \(2 index layers in use at start\), completing in the background: 10 left/);
    while (f.pending.length) {
      f.pending[0]!.resolve();
      await new Promise((r) => setImmediate(r));
    }
    await done;
    expect(f.maxRunning()).toBe(4);
    expect(q.current.state).toBe('done');
    expect(q.current.fetched).toBe(10);
    expect(q.status()).toMatch(/^11 of 11 files in the pool \(2 index layers in use at start\), done in \d+\.\d s$/);
  });

  it('tries the next location, counts a file failed only when all fail, and says what did not fit', async () => {
    const f = fakes({ maxParallel: 2, lowWatermark: 25, locations: 2 });
    const q = new ResumeQueue(f.deps);
    expect(q.window).toBe(1);
    const done = q.start(
      [
        { digest: dg(1), size: 10 },
        { digest: dg(2), size: 11 },
        { digest: dg(3), size: 100 }, // over the cap
      ],
      1,
    );
    await f.pendingAtLeast(1);
    expect(f.pending[0]!.req.digest).toBe(dg(1));
    f.pending[0]!.reject(unavailable('registry r0 down'));
    await f.pendingAtLeast(1);
    expect(f.pending[0]!.req.location.registry).toBe('r1.example');
    f.pending[0]!.resolve(); // dg(1) from the second location
    await f.pendingAtLeast(1);
    expect(f.pending[0]!.req.digest).toBe(dg(2));
    f.pending[0]!.reject(unavailable('r0 down'));
    await f.pendingAtLeast(1);
    f.pending[0]!.reject(unavailable('r1 down'));
    await done;
    expect(q.current).toMatchObject({ state: 'done', fetched: 1, failed: 1 });
    expect(q.status()).toMatch(/^1 of 3 files in the pool .*, done in .*, 1 failed, 1 files \(100 B\) over the pool cap not fetched$/);
  });

  it('waits again when only its wait hit the deadline and the download goes on', async () => {
    const f = fakes({ maxParallel: 2, lowWatermark: 100 });
    const q = new ResumeQueue(f.deps);
    const done = q.start([{ digest: dg(1), size: 1 }], 1);
    await f.pendingAtLeast(1);
    f.inFlight.add(dg(1));
    f.pending[0]!.reject(deadlineExceeded('fetch: not done within 60000 ms'));
    await f.pendingAtLeast(1); // asked again: joins the running download
    expect(f.pending[0]!.req.digest).toBe(dg(1));
    f.inFlight.delete(dg(1));
    f.pending[0]!.resolve();
    await done;
    expect(q.current).toMatchObject({ state: 'done', fetched: 1, failed: 0 });
  });

  it('a deadline with nothing in flight is a failure', async () => {
    const f = fakes({ maxParallel: 2, lowWatermark: 100 });
    const q = new ResumeQueue(f.deps);
    const done = q.start([{ digest: dg(1), size: 1 }], 1);
    await f.pendingAtLeast(1);
    f.pending[0]!.reject(deadlineExceeded('fetch: download not done within 60000 ms'));
    await done;
    expect(q.current).toMatchObject({ state: 'done', fetched: 0, failed: 1 });
  });

  it('close stops it: waits are aborted and nothing new is asked for', async () => {
    const f = fakes({ maxParallel: 4, lowWatermark: 1_000_000 });
    const q = new ResumeQueue(f.deps);
    const done = q.start(
      Array.from({ length: 6 }, (_, i) => ({ digest: dg(i + 1), size: 1 })),
      1,
    );
    await f.pendingAtLeast(2);
    await q.close();
    await done;
    expect(f.pending).toHaveLength(0);
    expect(q.current).toMatchObject({ state: 'stopped', fetched: 0, failed: 0 });
  });

  it('without mounted index layers the status says so', () => {
    const f = fakes({ maxParallel: 4, lowWatermark: 1 });
    expect(new ResumeQueue(f.deps).status()).toMatch(/^none/);
  });
});
