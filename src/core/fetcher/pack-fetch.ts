/**
 * One coalesced Range request of a pack (docs/format.md §10.2): the bytes of
 * several wanted members in one HTTP request, split into members as they
 * arrive; each member is decoded (bounded by its size), verified against its
 * content digest and committed to the pool before its waiters are told. A
 * member that does not match is rejected alone (its waiters get the error,
 * nothing enters the pool) and the other members of the response still land.
 *
 *   await fetchPackRange(deps, location, jobs);   // jobs: members of ONE pack (coalesce.ts chose them)
 *
 * - The request asks for bytes [first member's offset, last member's end)
 *   (range-body.ts, shared with chunked.ts; a registry ignoring Range works).
 * - Retries: a body that breaks mid-way is asked again, from the first
 *   member not yet delivered, while attempts and the deadline allow; the
 *   members already committed stay.
 * - The request is aborted only when every member's job gave up (its signal);
 *   a job that gave up still gets its member committed if the bytes come.
 * - Bounded by the fetch deadline per attempt.
 */
import { deadlineExceeded, describeError, GearError, isClass, unavailable } from '../errors.js';
import type { Logger } from '../log.js';
import type { BlobLocation } from '../index/manifest.js';
import type { RegistryClient } from '../registry/client.js';
import { sleep } from '../registry/retry.js';
import type { MemberRef } from './pack-types.js';
import { planRequest, type CoalesceBounds } from './coalesce.js';
import type { CommitSlots } from './commit-slots.js';
import { readPackRange } from './range-body.js';

/** One wanted member and how to tell its waiters. */
export interface PackJob {
  digest: string;
  size: number;
  member: MemberRef;
  /** The job gave up (no waiters, fetcher closing): it does not keep the request alive. */
  signal: AbortSignal;
  /** Settles the job: undefined = in the pool; `rejected` = its bytes did not match. */
  done(err?: unknown, rejected?: boolean): void;
  /** A container waits for it now (commit-slots.ts: goes first). */
  urgent?: () => boolean;
}

export interface PackFetchDeps {
  pool: { has(digest: string): boolean; addBuffer(digest: string, data: Buffer, opts?: { size?: number; zstd?: boolean }): Promise<void> };
  client: Pick<RegistryClient, 'openBlob'>;
  timeoutMs: number;
  maxAttempts: number;
  log: Logger;
  /** The fetcher's counters, updated in place: bytes received (gaps included), requests, members committed. */
  counters: { blobBytes: number; packRequests: number; packMembers: number; files: number; bytes: number };
  /** A member entered the pool. */
  onCommitted(job: PackJob): void;
  /** Fetcher-wide bound on commits at once (commit-slots.ts); none: unbounded beyond MAX_DELIVERIES per response. */
  slots?: CommitSlots;
}

/** Fetches the members of `jobs` (all of one pack) with as few Range requests as retries need (normally one). */
export async function fetchPackRange(deps: PackFetchDeps, location: BlobLocation, jobs: readonly PackJob[]): Promise<void> {
  const pack = jobs[0]!.member.pack;
  const repo = `${location.registry}/${location.repository}`;
  const pending = new Set(jobs);
  for (let attempt = 1; pending.size > 0; attempt++) {
    const list = [...pending].sort((a, b) => a.member.offset - b.member.offset);
    const controller = new AbortController();
    const live = () => list.some((j) => pending.has(j) && !j.signal.aborted);
    const onJobAbort = () => {
      if (!live()) controller.abort(list[0]!.signal.reason ?? unavailable('nobody waits for these members any more'));
    };
    for (const j of list) j.signal.addEventListener('abort', onJobAbort, { once: true });
    onJobAbort();
    const timer = setTimeout(
      () => controller.abort(deadlineExceeded(`fetch of ${list.length} members of pack ${pack.digest}: not done within ${deps.timeoutMs} ms; check the registry's reachability or raise GEAR_FETCH_TIMEOUT`)),
      deps.timeoutMs,
    );
    timer.unref();
    const signal = controller.signal;
    const deliveries = new Deliveries();
    try {
      const parts = list.map((job) => ({ offset: job.member.offset, length: job.member.length, job }));
      await readPackRange(deps, repo, pack, parts, signal, async ({ job: j }, stored) => {
        if (!pending.has(j)) return;
        pending.delete(j);
        await deliveries.add(deliver(deps, j, stored, repo), stored.length);
      });
    } catch (err) {
      if (pending.size === 0) break;
      const e = signal.aborted ? signal.reason : err;
      const retryable = !signal.aborted && (!(e instanceof GearError) || isClass(e, 'Unavailable')) && attempt < deps.maxAttempts;
      if (!retryable) {
        const why = e instanceof GearError ? e : unavailable(`fetch of pack ${pack.digest} from ${repo}: ${describeError(e)}; the next open tries again`, e);
        for (const j of pending) j.done(why);
        pending.clear();
        break;
      }
      deps.log.info({ pack: pack.digest, attempt, left: pending.size, err: describeError(e) }, 'pack range failed; retrying');
      await sleep(Math.min(2000, 100 * 2 ** attempt)).catch(() => undefined);
    } finally {
      await deliveries.drain();
      clearTimeout(timer);
      for (const j of list) j.signal.removeEventListener('abort', onJobAbort);
    }
  }
}

/** Members of one response being decoded and committed at once, at most (the body waits beyond). */
export const MAX_DELIVERIES = 8;
/** Stored bytes of those members held at once, at most (one member alone may be larger). */
export const MAX_DELIVERY_BYTES = 16 * 1024 * 1024;

/**
 * The members of one response in the pool's hands at once. A commit ends in
 * an fsync and its completion waits for a turn of the event loop: committing
 * the members of a response one at a time held a 930-file prefetch to 3 s on
 * an unshaped link, with the container's opens waiting in line. Bounded in
 * count and stored bytes (each decodes into at most its size, off the main
 * thread), so a slow disk slows the body (backpressure) instead of filling
 * memory; the commit slots (commit-slots.ts) bound them across responses.
 */
class Deliveries {
  private readonly running = new Map<Promise<void>, number>();
  private bytes = 0;

  /** Takes one delivery (which never rejects); resolves when there is room for the next. */
  async add(p: Promise<void>, bytes: number): Promise<void> {
    const tracked = p.finally(() => {
      this.running.delete(tracked);
      this.bytes -= bytes;
    });
    this.running.set(tracked, bytes);
    this.bytes += bytes;
    while (this.running.size >= MAX_DELIVERIES || (this.bytes > MAX_DELIVERY_BYTES && this.running.size > 1)) await Promise.race(this.running.keys());
  }

  /** Resolves when every delivery taken has settled. */
  async drain(): Promise<void> {
    await Promise.all(this.running.keys());
  }
}

/**
 * Decodes, verifies and commits one member (pool.addBuffer: all of it on the
 * threadpool, the main thread never touches the content); settles its job
 * either way.
 */
async function deliver(deps: PackFetchDeps, j: PackJob, stored: Buffer, repo: string): Promise<void> {
  const what = `fetch ${j.digest} (pack ${j.member.pack.digest} bytes ${j.member.offset}+${j.member.length}) from ${repo}`;
  if (deps.pool.has(j.digest)) {
    j.done();
    return;
  }
  const release = await deps.slots?.take(j.urgent?.() === true);
  try {
    if (release && deps.pool.has(j.digest)) return j.done(); // landed while this waited for a slot
    await deps.pool.addBuffer(j.digest, stored, { size: j.size, zstd: j.member.encoding === 'zstd' });
    deps.counters.files++;
    deps.counters.packMembers++;
    deps.counters.bytes += j.size;
    deps.onCommitted(j);
    j.done();
  } catch (err) {
    if (isClass(err, 'InvalidArgument')) {
      deps.log.warn({ digest: j.digest, pack: j.member.pack.digest, err: describeError(err) }, 'pack member rejected');
      j.done(unavailable(`${what}: content rejected: ${(err as Error).message}`, err), true);
      return;
    }
    j.done(err instanceof GearError ? err : unavailable(`${what}: ${describeError(err)}`, err));
  } finally {
    release?.();
  }
}

/**
 * Runs one batch of the fetcher's queued jobs (takePackBatch chose them) as
 * one fetchPackRange; `end` settles each job (err undefined: in the pool;
 * `rejected`: its bytes did not match).
 */
export async function runPackBatch<J extends { req: { digest: string; size: number; location: BlobLocation; member?: MemberRef | undefined }; controller: AbortController; priority: string }>(
  deps: PackFetchDeps,
  batch: readonly J[],
  end: (job: J, err?: unknown, rejected?: boolean) => void,
): Promise<void> {
  const jobs = batch.map((job) => ({
    digest: job.req.digest,
    size: job.req.size,
    member: job.req.member!,
    signal: job.controller.signal,
    done: (err?: unknown, rejected?: boolean) => end(job, err, rejected),
    urgent: () => job.priority === 'foreground',
  }));
  await fetchPackRange(deps, batch[0]!.req.location, jobs).catch((err: unknown) => {
    for (const j of batch) end(j, err);
  });
}

/** The pack a request's member lives in, with its location: members of one key may share a request. */
export function packKey(req: { location: BlobLocation; member?: MemberRef | undefined }): string {
  return `${req.location.registry}/${req.location.repository}@${req.member?.pack.digest ?? ''}`;
}

/**
 * The jobs one request serves: `seed` (already taken off its queue) and the
 * queued members of the same pack that coalesce with it (planRequest), taken
 * off `queues`.
 */
export function takePackBatch<J extends { req: { location: BlobLocation; member?: MemberRef | undefined } }>(seed: J, queues: J[][], bounds: CoalesceBounds): J[] {
  const key = packKey(seed.req);
  const candidates: Array<{ job: J; offset: number; length: number }> = [];
  for (const q of queues) for (const job of q) if (job.req.member && packKey(job.req) === key) candidates.push({ job, offset: job.req.member.offset, length: job.req.member.length });
  if (candidates.length === 0) return [seed];
  const m = seed.req.member!;
  const s = { job: seed, offset: m.offset, length: m.length };
  const plan = planRequest(s, candidates, bounds);
  const taken = new Set(plan.members.map((c) => c.job));
  for (const q of queues) {
    for (let i = q.length - 1; i >= 0; i--) if (taken.has(q[i]!)) q.splice(i, 1);
  }
  return plan.members.map((c) => c.job);
}
