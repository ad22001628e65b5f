/**
 * One Gear file into the pool with background priority, trying each registry
 * location the catalog knows: what crash resume (resume.ts) and prefetch
 * (prefetch.ts) both do for every file they complete.
 */
import { describeError, isClass } from '../errors.js';
import type { FetchOptions, FetchRequest } from '../fetcher/fetcher.js';

export interface BackgroundFetchDeps {
  pool: { has(digest: string): boolean };
  fetcher: { fetch(req: FetchRequest, opts?: FetchOptions): Promise<void>; inFlight(digest: string): boolean };
  catalog: { requests(digest: string): FetchRequest[] };
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
