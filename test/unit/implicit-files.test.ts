/**
 * ImplicitFiles (files read without OPEN): sharing, failures, bounds and
 * closing, with an in-memory provider (pure logic; the real FUSE side is in
 * missfs-noopen.test.ts).
 */
import { afterEach, describe, expect, it } from 'vitest';
import { ImplicitFiles } from '../../src/core/missfs/implicit-files.js';
import type { MissFile } from '../../src/core/missfs/types.js';

interface Fake {
  files: ImplicitFiles;
  opens: string[];
  closes: string[];
  /** Open calls not settled yet, by hex (resolve with a file, or reject). */
  pending: Map<string, { resolve: () => void; reject: (e: Error) => void }>;
}

const made: ImplicitFiles[] = [];

function fake(opts: { max?: number; idleMs?: number; failedIdleMs?: number; manual?: boolean } = {}): Fake {
  const opens: string[] = [];
  const closes: string[] = [];
  const pending = new Map<string, { resolve: () => void; reject: (e: Error) => void }>();
  const file = (hex: string): MissFile => ({
    read: async (buf) => {
      buf.write(hex.slice(0, buf.length));
      return Math.min(buf.length, hex.length);
    },
    close: async () => undefined,
  });
  const files = new ImplicitFiles({
    open: (hex) => {
      opens.push(hex);
      if (!opts.manual) return Promise.resolve(file(hex));
      return new Promise<MissFile>((resolve, reject) => pending.set(hex, { resolve: () => resolve(file(hex)), reject }));
    },
    close: async (_ino, hex) => void closes.push(hex),
    ...(opts.max !== undefined ? { max: opts.max } : {}),
    ...(opts.idleMs !== undefined ? { idleMs: opts.idleMs } : {}),
    ...(opts.failedIdleMs !== undefined ? { failedIdleMs: opts.failedIdleMs } : {}),
  });
  made.push(files);
  return { files, opens, closes, pending };
}

const read1 = (f: MissFile) => f.read(Buffer.alloc(4), 0);
const never = new AbortController().signal;
const tick = () => new Promise((r) => setImmediate(r));

afterEach(async () => {
  for (const f of made.splice(0)) await f.closeAll();
});

describe('ImplicitFiles', () => {
  it('opens a file once for many reads, concurrent or not, and keeps it until idle', async () => {
    const f = fake({ manual: true });
    const r1 = f.files.use(1n, 'aaaa', never, read1);
    const r2 = f.files.use(1n, 'aaaa', never, read1);
    await tick();
    expect(f.opens).toEqual(['aaaa']);
    f.pending.get('aaaa')!.resolve();
    expect(await Promise.all([r1, r2])).toEqual([4, 4]);
    expect(await f.files.use(1n, 'aaaa', never, read1)).toBe(4);
    expect(f.opens).toEqual(['aaaa']);
    expect(f.files.size).toBe(1);
    f.files.sweep(Date.now() + 60_000);
    await tick();
    expect(f.closes).toEqual(['aaaa']);
    expect(f.files.size).toBe(0);
  });

  it('a failed open is not kept: the next read opens again', async () => {
    const f = fake({ manual: true });
    const r1 = f.files.use(1n, 'bbbb', never, read1);
    await tick();
    f.pending.get('bbbb')!.reject(new Error('fetch failed'));
    await expect(r1).rejects.toThrow('fetch failed');
    expect(f.files.size).toBe(0);
    const r2 = f.files.use(1n, 'bbbb', never, read1);
    await tick();
    f.pending.get('bbbb')!.resolve();
    expect(await r2).toBe(4);
    expect(f.opens).toEqual(['bbbb', 'bbbb']);
  });

  it('a failed read keeps the file, as an open file stays open, until no read used it for failedIdleMs', async () => {
    const f = fake({ failedIdleMs: 5_000 });
    await f.files.use(1n, 'cccc', never, read1);
    await expect(
      f.files.use(1n, 'cccc', never, async () => {
        throw new Error('digest mismatch');
      }),
    ).rejects.toThrow('digest mismatch');
    await tick();
    // The next read goes to the same file (a download that failed verification fails it again, without a
    // new download); it is not closed before failedIdleMs without reads.
    expect(f.closes).toEqual([]);
    await f.files.use(1n, 'cccc', never, read1);
    expect(f.opens).toEqual(['cccc']);
    f.files.sweep(Date.now() + 4_000);
    await tick();
    expect(f.closes).toEqual([]);
    f.files.sweep(Date.now() + 5_000);
    await tick();
    expect(f.closes).toEqual(['cccc']);
    // Then the next read opens it again (the "next open" of a kernel that sends no OPEN).
    await f.files.use(1n, 'cccc', never, read1);
    expect(f.opens).toEqual(['cccc', 'cccc']);
    // A file that never failed stays for idleMs.
    f.files.sweep(Date.now() + 10_000);
    await tick();
    expect(f.closes).toEqual(['cccc']);
  });

  it('an aborted read gives up waiting, but the open goes on and serves the next read', async () => {
    const f = fake({ manual: true });
    const ac = new AbortController();
    const r1 = f.files.use(1n, 'dddd', ac.signal, read1);
    await tick();
    ac.abort(new Error('interrupted'));
    await expect(r1).rejects.toThrow('interrupted');
    f.pending.get('dddd')!.resolve();
    await tick();
    expect(await f.files.use(1n, 'dddd', never, read1)).toBe(4);
    expect(f.opens).toEqual(['dddd']);
    expect(f.closes).toEqual([]);
  });

  it('drop() (the kernel forgot the node) closes at once when idle, after the last read when busy', async () => {
    const f = fake();
    await f.files.use(1n, 'eeee', never, read1);
    f.files.drop(1n);
    await tick();
    expect(f.closes).toEqual(['eeee']);
    let release!: () => void;
    const busy = f.files.use(2n, 'ffff', never, (file) => new Promise<number>((r) => (release = () => void r(read1(file)))));
    await tick();
    await tick();
    f.files.drop(2n);
    await tick();
    expect(f.closes).toEqual(['eeee']);
    release();
    await busy;
    await tick();
    expect(f.closes).toEqual(['eeee', 'ffff']);
  });

  it('beyond max, idle files are closed least recently used first', async () => {
    const f = fake({ max: 10 });
    for (let i = 0; i < 10; i++) await f.files.use(BigInt(i), `h${i}`, never, read1);
    await f.files.use(0n, 'h0', never, read1); // h0 is now the most recently used
    await f.files.use(10n, 'h10', never, read1);
    await tick();
    expect(f.files.size).toBeLessThanOrEqual(10);
    expect(f.closes[0]).toBe('h1');
    expect(f.closes).not.toContain('h0');
    expect(f.closes).not.toContain('h10');
  });

  it('closeAll closes every file, and later reads are refused', async () => {
    const f = fake();
    await f.files.use(1n, 'gggg', never, read1);
    await f.files.use(2n, 'hhhh', never, read1);
    await f.files.closeAll();
    expect(f.closes.sort()).toEqual(['gggg', 'hhhh']);
    await expect(f.files.use(3n, 'iiii', never, read1)).rejects.toThrow(/ended/);
  });
});
