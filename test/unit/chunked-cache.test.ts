/**
 * ChunkedFiles' chunk cache (core/fetcher/chunked.ts) under pressure: while
 * the assembly of a big file has its read-ahead chunks in flight, readers of
 * its far end fetch chunks the assembly needs last, and the cache goes past
 * its bound as the assembly goes on. Chunks still being fetched, and chunks
 * the assembly has yet to write, must not be dropped before those it wrote
 * (that fetched them again). The registry is a
 * stand-in `openBlob` over an in-memory pack whose answers wait for a gate:
 * pure ordering logic, no network.
 */
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { ChunkedFiles } from '../../src/core/fetcher/chunked.js';
import type { FetchRequest } from '../../src/core/fetcher/pack-types.js';
import { silentLogger } from '../../src/core/log.js';

const MiB = 1024 * 1024;
const CHUNKS = 48; // 48 MiB: more than the 32 MiB the cache keeps

describe('chunk cache', () => {
  it('keeps chunks that are still being fetched: a big file assembled while readers jump around is fetched once', async () => {
    const chunkBytes = (i: number) => Buffer.alloc(MiB, i + 1);
    const pack = Buffer.concat(Array.from({ length: CHUNKS }, (_, i) => chunkBytes(i)));
    const packLoc = { digest: `sha256:${createHash('sha256').update(pack).digest('hex')}`, size: pack.length };
    const req: FetchRequest = {
      digest: `sha256:${createHash('sha256').update(pack).digest('hex')}`,
      size: pack.length,
      location: { registry: 'r.invalid', repository: 'big' },
      chunks: {
        chunkSize: MiB,
        chunks: Array.from({ length: CHUNKS }, (_, i) => ({
          pack: packLoc,
          offset: i * MiB,
          length: MiB,
          encoding: 'raw' as const,
          digest: `sha256:${createHash('sha256').update(chunkBytes(i)).digest('hex')}`,
          bytes: MiB,
        })),
      },
    };
    const asked: number[] = [];
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const client = {
      openBlob: async (_repo: unknown, _digest: string, opts?: { range?: { start: number; end: number } }) => {
        const { start, end } = opts!.range!;
        for (let i = Math.floor(start / MiB); i <= Math.floor(end / MiB); i++) asked.push(i);
        await gate;
        return { stream: Readable.from([pack.subarray(start, end + 1)]) };
      },
    };
    const files = new ChunkedFiles({
      client: client as never,
      timeoutMs: 30_000,
      bounds: { maxGap: 64 * 1024, maxRequest: 8 * MiB },
      log: silentLogger(),
      counters: { blobBytes: 0, packRequests: 0 },
    });
    // The assembly: chunk 0 and 8 MiB of read-ahead in flight.
    const written: Buffer[] = [];
    const writer = { size: 0, write: async (b: Buffer) => void written.push(Buffer.from(b)) };
    const assembled = files.assemble(req, writer as never, new AbortController().signal, () => undefined);
    // Readers of the last third, one chunk each: what the assembly needs last, kept while it writes the rest.
    const reader = files.open(req, async () => null);
    const reads: Array<Promise<number>> = [];
    const bufs: Buffer[] = [];
    for (let i = 32; i < CHUNKS; i++) {
      const b = Buffer.alloc(16);
      bufs.push(b);
      reads.push(reader.read(b, i * MiB + 5));
    }
    for (let t = 0; t < 5; t++) await new Promise((r) => setImmediate(r));
    open();
    await Promise.all(reads);
    await assembled;
    await reader.close();
    bufs.forEach((b, k) => expect(b.equals(Buffer.alloc(16, 32 + k + 1))).toBe(true));
    expect(Buffer.concat(written).equals(pack)).toBe(true);
    // Every chunk asked for once.
    const counts = new Map<number, number>();
    for (const i of asked) counts.set(i, (counts.get(i) ?? 0) + 1);
    expect([...counts.entries()].filter(([, n]) => n > 1)).toEqual([]);
    expect(counts.size).toBe(CHUNKS);
  }, 60_000);
});
