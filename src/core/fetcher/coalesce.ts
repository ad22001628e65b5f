/**
 * Range coalescing (pure logic): which wanted members of one pack go into one
 * HTTP Range request. Members are merged when they are adjacent or separated
 * by a gap of at most `maxGap` bytes (the gap is downloaded and thrown away:
 * cheaper than a round trip), as long as the request stays within
 * `maxRequest` bytes. A member longer than `maxRequest` is a request of its
 * own.
 *
 *   const plan = planRequest(seed, candidates, { maxGap: 64 << 10, maxRequest: 8 << 20 });
 *   // plan.start … plan.end−1: one Range request; plan.members: what it serves (seed first)
 *   const groups = groupRanges(items, bounds);   // every item into requests (prefetch, chunk runs)
 */

/** A byte range of a pack that someone wants. */
export interface Wanted {
  offset: number;
  length: number;
}

export interface CoalesceBounds {
  /** Largest gap (bytes nobody wants) bridged inside one request. */
  maxGap: number;
  /** Largest request (bytes from its first to its last byte), unless one member alone is larger. */
  maxRequest: number;
}

/** Default gap bridged: 64 KiB. */
export const DEFAULT_MAX_GAP = 64 * 1024;
/** Default bound of one request: 8 MiB. */
export const DEFAULT_MAX_REQUEST = 8 * 1024 * 1024;

export interface RequestPlan<T extends Wanted> {
  /** First byte of the request. */
  start: number;
  /** One past the last byte. */
  end: number;
  /** The members it serves, in offset order. */
  members: T[];
}

/**
 * One request around `seed`: grows from the seed's range to the candidates
 * nearest to it (after it first, then before it), each bridging at most
 * maxGap, while the request stays within maxRequest. Candidates not taken are
 * left for other requests. Identical ranges (the same bytes) are all taken
 * together with the first.
 */
export function planRequest<T extends Wanted>(seed: T, candidates: readonly T[], bounds: CoalesceBounds): RequestPlan<T> {
  const sorted = candidates.filter((c) => c !== seed).sort((a, b) => a.offset - b.offset || a.length - b.length);
  let start = seed.offset;
  let end = seed.offset + seed.length;
  const taken: T[] = [seed];
  // Forward: members starting at or after the seed.
  const after = sorted.filter((c) => c.offset >= seed.offset);
  const before = sorted.filter((c) => c.offset < seed.offset).reverse();
  for (const c of after) {
    const cEnd = c.offset + c.length;
    if (c.offset > end + bounds.maxGap) break;
    const newEnd = Math.max(end, cEnd);
    if (newEnd - start > bounds.maxRequest) break;
    end = newEnd;
    taken.push(c);
  }
  for (const c of before) {
    const cEnd = c.offset + c.length;
    if (cEnd + bounds.maxGap < start) break;
    const newStart = Math.min(start, c.offset);
    if (end - newStart > bounds.maxRequest) break;
    start = newStart;
    end = Math.max(end, cEnd);
    taken.push(c);
  }
  taken.sort((a, b) => a.offset - b.offset);
  return { start, end, members: taken };
}

/**
 * Every item into requests, in offset order: a request takes the next items
 * while each starts within maxGap of the request's end and the request stays
 * within maxRequest.
 */
export function groupRanges<T extends Wanted>(items: readonly T[], bounds: CoalesceBounds): RequestPlan<T>[] {
  const sorted = [...items].sort((a, b) => a.offset - b.offset || a.length - b.length);
  const out: RequestPlan<T>[] = [];
  let cur: RequestPlan<T> | undefined;
  for (const it of sorted) {
    const itEnd = it.offset + it.length;
    if (cur && it.offset <= cur.end + bounds.maxGap && Math.max(cur.end, itEnd) - cur.start <= bounds.maxRequest) {
      cur.end = Math.max(cur.end, itEnd);
      cur.members.push(it);
      continue;
    }
    cur = { start: it.offset, end: itEnd, members: [it] };
    out.push(cur);
  }
  return out;
}
