/** Range coalescing of pack members (src/core/fetcher/coalesce.ts, pack-fetch.ts takePackBatch): pure logic. */
import { describe, expect, it } from 'vitest';
import { groupRanges, planRequest } from '../../src/core/fetcher/coalesce.js';
import { takePackBatch } from '../../src/core/fetcher/pack-fetch.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const bounds = { maxGap: 64 * KiB, maxRequest: 8 * MiB };
const m = (offset: number, length: number) => ({ offset, length });

describe('planRequest', () => {
  it('merges adjacent members and gaps up to maxGap, around the seed', () => {
    const a = m(0, 100);
    const b = m(100, 100); // adjacent
    const c = m(200 + 64 * KiB, 10); // gap of exactly 64 KiB
    const d = m(210 + 64 * KiB + 64 * KiB + 1, 10); // gap one byte too many
    const plan = planRequest(b, [a, c, d], bounds);
    expect(plan.members).toEqual([a, b, c]);
    expect(plan.start).toBe(0);
    expect(plan.end).toBe(c.offset + c.length);
  });

  it('keeps one request within maxRequest, a lone oversized member alone', () => {
    const items = Array.from({ length: 20 }, (_, i) => m(i * MiB, MiB));
    const plan = planRequest(items[0]!, items, bounds);
    expect(plan.end - plan.start).toBe(8 * MiB);
    expect(plan.members).toHaveLength(8);
    const huge = m(100 * MiB, 20 * MiB);
    const p2 = planRequest(huge, [m(120 * MiB, 10), m(99 * MiB, 10)], bounds);
    expect(p2.members).toEqual([huge]);
    expect(p2.end - p2.start).toBe(20 * MiB);
  });

  it('takes identical ranges together and ignores order of candidates', () => {
    const a = m(500, 50);
    const a2 = m(500, 50);
    const z = m(0, 10);
    const plan = planRequest(a, [a2, z], { maxGap: 0, maxRequest: MiB });
    expect(plan.members).toEqual([a, a2]);
  });
});

describe('groupRanges', () => {
  it('splits on gaps and on the request bound, in offset order', () => {
    const items = [m(3 * MiB, 10), m(0, 10), m(10, 10), m(200 * KiB, 10), m(8 * MiB - 5, 10)];
    const groups = groupRanges(items, bounds);
    expect(groups.map((g) => [g.start, g.end, g.members.length])).toEqual([
      [0, 20, 2],
      [200 * KiB, 200 * KiB + 10, 1],
      [3 * MiB, 3 * MiB + 10, 1],
      [8 * MiB - 5, 8 * MiB + 5, 1],
    ]);
  });
});

describe('takePackBatch', () => {
  const loc = { registry: 'r:5000', repository: 'a/b' };
  const pack = (d: string) => ({ digest: d, size: 100 * MiB });
  const job = (p: string, offset: number, length: number, repository = 'a/b') => ({
    req: { location: { ...loc, repository }, member: { pack: pack(p), offset, length, encoding: 'zstd' as const } },
  });

  it('takes queued members of the same pack and location off both queues, leaves the rest', () => {
    const seed = job('P', 1000, 100);
    const fgSame = job('P', 0, 1000);
    const bgSame = job('P', 1100, 50);
    const bgFar = job('P', 50 * MiB, 10);
    const otherPack = job('Q', 1150, 10);
    const otherRepo = job('P', 1150, 10, 'c/d');
    const fg = [fgSame, otherPack];
    const bg = [bgSame, otherRepo, bgFar];
    const batch = takePackBatch(seed, [fg, bg], bounds);
    expect(batch).toEqual([fgSame, seed, bgSame]);
    expect(fg).toEqual([otherPack]);
    expect(bg).toEqual([otherRepo, bgFar]);
  });

  it('a seed alone when nothing else is queued', () => {
    const seed = job('P', 0, 10);
    expect(takePackBatch(seed, [[], []], bounds)).toEqual([seed]);
  });
});
