/** The catalog's v3 locations (src/core/lazy/catalog.ts): records of every age, mixed v2/v3 owners, read-ahead neighbours. */
import { describe, expect, it } from 'vitest';
import { BlobCatalog, layoutOf, MAX_READ_AHEAD_FILES, type GearBlobTuple } from '../../src/core/lazy/catalog.js';
import { summarize } from '../../src/core/layers/index-entry.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';

const d = (n: number) => `sha256:${n.toString(16).padStart(64, '0')}`;
const loc = { registry: 'r:5000', repository: 'app' };
const packs = [
  { digest: d(900), size: 10_000 },
  { digest: d(901), size: 5_000_000 },
];

describe('BlobCatalog with format v3 records', () => {
  it('reads old tuples (raw, gzip) and v3 tuples (member, chunks) side by side', () => {
    const c = new BlobCatalog();
    const tuples: GearBlobTuple[] = [
      [d(1), 10],
      [d(2), 20, d(202), 15],
      [d(3), 30, { p: 0, o: 100, l: 25 }],
      [d(4), 3_000_000, { cs: 1_048_576, c: [[1, 0, 500, d(41)], [1, 500, 600, d(42), 1], [1, 1100, 700, d(43)]] }],
    ];
    c.add('L', loc, tuples, packs);
    expect(c.requests(d(1))[0]).toMatchObject({ digest: d(1), size: 10, blob: undefined });
    expect(c.requests(d(1))[0]!.member).toBeUndefined();
    expect(c.requests(d(2))[0]!.blob).toMatchObject({ digest: d(202), size: 15 });
    expect(c.requests(d(3))[0]!.member).toEqual({ pack: packs[0], offset: 100, length: 25, encoding: 'zstd' });
    const ch = c.requests(d(4))[0]!.chunks!;
    expect(ch.chunkSize).toBe(1_048_576);
    expect(ch.chunks.map((x) => [x.offset, x.length, x.encoding, x.bytes])).toEqual([
      [0, 500, 'zstd', 1_048_576],
      [500, 600, 'raw', 1_048_576],
      [1100, 700, 'zstd', 3_000_000 - 2 * 1_048_576],
    ]);
    expect(c.isChunked(d(4))).toBe(true);
    expect(c.isChunked(d(3))).toBe(false);
  });

  it('a content in a v2 and a v3 index: one entry, both ways to fetch it, the pack first; removing one owner keeps the other', () => {
    const c = new BlobCatalog();
    c.add('v2', { registry: 'r:5000', repository: 'old' }, [[d(7), 70, d(707), 50]]);
    c.add('v3', loc, [[d(7), 70, { p: 0, o: 0, l: 60 }]], packs);
    expect(c.files).toBe(1);
    const reqs = c.requests(d(7));
    expect(reqs.map((r) => (r.member ? 'pack' : 'blob'))).toEqual(['pack', 'blob']);
    c.remove('v3');
    expect(c.requests(d(7)).map((r) => (r.member ? 'pack' : 'blob'))).toEqual(['blob']);
    // The other way round: the first owner goes, the second stays (and its pack neighbours with it).
    c.add('v3', loc, [[d(7), 70, { p: 0, o: 0, l: 60 }], [d(8), 80, { p: 0, o: 60, l: 40 }]], packs);
    c.remove('v2');
    expect(c.requests(d(7)).map((r) => (r.member ? 'pack' : 'blob'))).toEqual(['pack']);
    expect(c.neighbours(c.requests(d(7))[0]!, 1000, () => true).map((r) => r.digest)).toEqual([d(8)]);
    c.remove('v3');
    expect(c.files).toBe(0);
    expect(c.has(d(7))).toBe(false);
  });

  it('a tuple naming a pack the record does not have is not taken as a member', () => {
    expect(layoutOf([d(1), 10, { p: 5, o: 0, l: 10 }], packs)).toBeUndefined();
    expect(layoutOf([d(1), 10, { p: 0, o: 0, l: 10 }], undefined)).toBeUndefined();
  });

  it('neighbours: the following one-member files of the same pack, in offset order, within the byte budget and the filter', () => {
    const c = new BlobCatalog();
    const tuples: GearBlobTuple[] = [];
    for (let i = 0; i < 10; i++) tuples.push([d(100 + i), 1000 + i, { p: 0, o: i * 500, l: 500 }]);
    c.add('L', loc, tuples, packs);
    const seed = c.requests(d(103))[0]!;
    const n = c.neighbours(seed, 1500, (x) => x !== d(105));
    expect(n.map((r) => r.digest)).toEqual([d(104), d(106)]); // 105 filtered out but counted against the budget
    expect(n[0]!.member).toEqual({ pack: packs[0], offset: 2000, length: 500, encoding: 'zstd' });
    expect(c.neighbours(seed, 0, () => true)).toEqual([]);
    expect(c.neighbours(c.requests(d(109))[0]!, 10_000, () => true)).toEqual([]);
  });

  it('neighbours: at most MAX_READ_AHEAD_FILES per miss, however tiny the members (a hostile index of 1-byte members)', () => {
    const c = new BlobCatalog();
    const tuples: GearBlobTuple[] = [];
    for (let i = 0; i < 5000; i++) tuples.push([d(1000 + i), 1, { p: 0, o: i, l: 1, e: 'raw' }]);
    c.add('L', loc, tuples, packs);
    const n = c.neighbours(c.requests(d(1000))[0]!, 1 << 20, () => true);
    expect(n.length).toBe(MAX_READ_AHEAD_FILES);
    expect(n[0]!.digest).toBe(d(1001));
  });
  it('neighbours with dirBytes: the run of the member\'s directory on both sides first, when it spans at most dirBytes; then the window', () => {
    // 10 members of 500 bytes; directories (g): 0 0 1 1 1 1 2 2 2 3.
    const groups = [0, 0, 1, 1, 1, 1, 2, 2, 2, 3];
    const c = new BlobCatalog();
    c.add('L', loc, groups.map((g, i): GearBlobTuple => [d(100 + i), 1000, { p: 0, o: i * 500, l: 500, g }]), packs);
    const seed = c.requests(d(103))[0]!;
    const ids = (n: { digest: string }[]) => n.map((r) => Number.parseInt(r.digest.slice(7), 16));
    // Directory 1 spans 2,000 bytes: 102 before the member, 104 and 105 after; the 1,500-byte window then adds 106.
    expect(ids(c.neighbours(seed, 1500, () => true, 2000))).toEqual([102, 104, 105, 106]);
    // A run longer than dirBytes is not taken: the forward window alone.
    expect(ids(c.neighbours(seed, 1500, () => true, 1999))).toEqual([104, 105, 106]);
    expect(ids(c.neighbours(seed, 1500, () => true))).toEqual([104, 105, 106]);
    // The filter applies to the directory's files too, and the window counts them (104, 105) against its bytes.
    expect(ids(c.neighbours(seed, 1000, (x) => x !== d(102), 2000))).toEqual([104, 105]);
    // The last member of a directory: the ones before it.
    expect(ids(c.neighbours(c.requests(d(108))[0]!, 500, () => true, 4000))).toEqual([106, 107, 109]);
    // Records written before directories were recorded (no g): no directory read-ahead.
    const old = new BlobCatalog();
    old.add('L', loc, groups.map((_, i): GearBlobTuple => [d(100 + i), 1000, { p: 0, o: i * 500, l: 500 }]), packs);
    expect(ids(old.neighbours(old.requests(d(103))[0]!, 1500, () => true, 1 << 20))).toEqual([104, 105, 106]);
  });

  it('neighbours with dirBytes: a directory run of more than MAX_READ_AHEAD_FILES members is not taken whole', () => {
    const c = new BlobCatalog();
    const tuples: GearBlobTuple[] = [];
    for (let i = 0; i < MAX_READ_AHEAD_FILES + 10; i++) tuples.push([d(1000 + i), 1, { p: 0, o: i, l: 1, e: 'raw', g: 0 }]);
    c.add('L', loc, tuples, packs);
    const n = c.neighbours(c.requests(d(1005))[0]!, 4, () => true, 1 << 20);
    expect(n.map((r) => r.digest)).toEqual([d(1006), d(1007), d(1008), d(1009)]);
  });

  it("summarize numbers each directory of an index's files (the first path of a content)", () => {
    const member = (o: number) => ({ pack: 0, offset: o, length: 10, encoding: 'zstd' as const });
    const m = {
      version: 3,
      packs: [{ digest: d(900), size: 100 }],
      files: [
        { path: 'a/x', digest: d(1), size: 10, member: member(0) },
        { path: 'a/y', digest: d(2), size: 10, member: member(10) },
        { path: 'b/x', digest: d(1), size: 10, member: member(0) },
        { path: 'b/z', digest: d(3), size: 10, member: member(20) },
        { path: 'top', digest: d(4), size: 10, member: member(30) },
      ],
    } as unknown as IndexManifest;
    const g = Object.fromEntries(summarize(m).blobs.map((t) => [t[0], (t[2] as { g?: number }).g]));
    expect(g).toEqual({ [d(1)]: 0, [d(2)]: 0, [d(3)]: 1, [d(4)]: 2 });
  });
});
