/**
 * One Gear file into the pool with background priority, trying each registry
 * location the catalog knows: what crash resume (resume.ts) and prefetch
 * (prefetch.ts) both do for every file they complete.
 */
import { setMaxListeners } from 'node:events';
import { describeError, isClass } from '../errors.js';
import type { FetchOptions, FetchRequest } from '../fetcher/fetcher.js';

export interface BackgroundFetchDeps {
  pool: { has(digest: string): boolean };
  fetcher: {
    fetch(req: FetchRequest, opts?: FetchOptions): Promise<void>;
    inFlight(digest: string): boolean;
    /** Queues all, then starts: members of one pack coalesce into few Range requests (format v3). */
    fetchMany?(reqs: readonly FetchRequest[], opts?: FetchOptions): Promise<void>[];
  };
  catalog: { requests(digest: string): FetchRequest[] };
}

/** Files queued at once per round of fetchPacked: the fetcher merges those of one pack into Range requests. */
const PACKED_ROUND = 1024;

/**
 * Format v3: the files of `digests` that are pack members, queued together
 * (in the given order, PACKED_ROUND at a time, background priority) so that
 * the fetcher serves each pack's wanted members with few coalesced Range
 * requests instead of one request per file (prefetch, crash resume). Returns
 * the digests now in the pool; the caller gives the others the per-file path
 * (fetchInBackground: other locations too).
 */
export async function fetchPacked(deps: BackgroundFetchDeps, digests: readonly string[], signal: AbortSignal): Promise<Set<string>> {
  const { fetcher, catalog, pool } = deps;
  const done = new Set<string>();
  if (!fetcher.fetchMany) return done;
  // Every queued file waits on this one signal: up to PACKED_ROUND listeners by design, not a leak.
  setMaxListeners(0, signal);
  const packed = digests.flatMap((d) => {
    const req = catalog.requests(d)[0];
    return req?.member ? [req] : [];
  });
  for (let i = 0; i < packed.length && !signal.aborted; i += PACKED_ROUND) {
    const round = packed.slice(i, i + PACKED_ROUND).filter((r) => !pool.has(r.digest));
    await Promise.allSettled(fetcher.fetchMany(round, { priority: 'background', signal }));
    for (const r of round) if (pool.has(r.digest)) done.add(r.digest);
  }
  return done;
}

/**
 * Resolves whether the file is in the pool afterwards, and why not when it is
 * not (undefined after an abort). A wait that hit the fetch deadline while the
 * job (kept: background) is still queued behind containers' fetches or
 * running waits for it again.
 */
export async function fetchInBackground(deps: BackgroundFetchDeps, digest: string, signal: AbortSignal): Promise<{ inPool: boolean; why?: string }> {
  const { pool, fetcher, catalog } = deps;
  if (pool.has(digest)) return { inPool: true };
  let last: unknown;
  for (const req of catalog.requests(digest)) {
    for (;;) {
      try {
        await fetcher.fetch(req, { priority: 'background', signal });
        return { inPool: true };
      } catch (err) {
        last = err;
        if (signal.aborted || pool.has(digest)) return { inPool: pool.has(digest) };
        if (isClass(err, 'DeadlineExceeded') && fetcher.inFlight(digest)) continue;
        break;
      }
    }
  }
  if (pool.has(digest)) return { inPool: true };
  return { inPool: false, ...(signal.aborted ? {} : { why: last === undefined ? 'no registry location known' : describeError(last) }) };
}
