/**
 * What this daemon run did with each Gear file, kept cheaply where the
 * counting already happens (the provider's LOOKUP hit/miss, the fetcher's end
 * of a download), so that `gear stats` can attribute it to index layers and
 * containers at query time:
 *
 * - fetched: downloaded from a registry and verified into the pool (any
 *   reason: a container's need, prefetch, crash resume), with content bytes;
 * - hits: a container's need (a LOOKUP that reached the miss filesystem)
 *   found the file already in the pool;
 * - misses: a container's need that had to go to the registry;
 * - per container: the misses its processes caused (the FUSE request carries
 *   the caller's pid; callers.ts maps it to the container's layer).
 *
 * Opens that overlay serves from ROOT/pool itself never reach the daemon:
 * reads of files already in the pool cannot be attributed to a container,
 * and "hits" is a lower bound of the pool's use.
 *
 * Memory: one Set entry per distinct digest (bounded by the catalog), plus
 * per container a Set of the digests it caused to be fetched. Counters start
 * at zero with each daemon start.
 */

export interface ContainerUsage {
  /** Digests whose fetch this container's processes caused (LOOKUP misses). */
  misses: Set<string>;
  /** Digests this container needed that the miss filesystem found in the pool. */
  hits: Set<string>;
}

/** At most this many containers are tracked (oldest dropped first). */
const MAX_CONTAINERS = 4096;
/** LOOKUP callers remembered at most while their need is being served (the oldest go first). */
const MAX_PENDING_CALLERS = 4096;

export class UsageTracker {
  /** digest → content bytes, downloaded by this run. */
  readonly fetched = new Map<string, number>();
  readonly hits = new Set<string>();
  readonly misses = new Set<string>();
  /** Failed downloads per digest (any outcome but ok). */
  readonly failed = new Map<string, number>();
  /** container layer id → its usage. */
  readonly containers = new Map<string, ContainerUsage>();
  /** The pid of the last LOOKUP of each digest still being served (set by the miss filesystem). */
  private readonly callers = new Map<string, number>();
  /** Maps a caller pid to the container layer it runs in (callers.ts); undefined: not attributable. */
  private readonly resolve: ((pid: number) => Promise<string | undefined>) | undefined;

  constructor(opts: { resolveCaller?: (pid: number) => Promise<string | undefined> } = {}) {
    this.resolve = opts.resolveCaller;
  }

  /** The miss filesystem got a LOOKUP of digest from pid (0: not visible from our pid namespace). */
  noteCaller(digest: string, pid: number): void {
    if (pid <= 0) return;
    // Bounded: a LOOKUP the provider refuses (a name not in the catalog) or joins in flight never reaches noteNeed.
    this.callers.delete(digest);
    if (this.callers.size >= MAX_PENDING_CALLERS) this.callers.delete(this.callers.keys().next().value!);
    this.callers.set(digest, pid);
  }

  /** A container's need of digest, hit or miss (the provider's LOOKUP). */
  noteNeed(digest: string, hit: boolean): void {
    (hit ? this.hits : this.misses).add(digest);
    const pid = this.callers.get(digest);
    this.callers.delete(digest);
    if (pid === undefined || !this.resolve) return;
    // The caller is blocked in its LOOKUP meanwhile, so its /proc entry is still there.
    this.resolve(pid).then(
      (layer) => {
        if (layer) this.container(layer)[hit ? 'hits' : 'misses'].add(digest);
      },
      () => undefined,
    );
  }

  /** A download ended (the fetcher's observer). */
  noteFetch(outcome: string, bytes: number, digest: string | undefined): void {
    if (!digest) return;
    if (outcome === 'ok') this.fetched.set(digest, bytes);
    else this.failed.set(digest, (this.failed.get(digest) ?? 0) + 1);
  }

  private container(layer: string): ContainerUsage {
    let c = this.containers.get(layer);
    if (!c) {
      if (this.containers.size >= MAX_CONTAINERS) this.containers.delete(this.containers.keys().next().value!);
      c = { misses: new Set(), hits: new Set() };
      this.containers.set(layer, c);
    }
    return c;
  }

  /** A container layer was removed. */
  forgetContainer(layer: string): void {
    this.containers.delete(layer);
  }
}
