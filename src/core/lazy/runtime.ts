/**
 * The lazy machinery of one store root, opened and closed as a unit:
 * pool (ROOT/pool) → fetcher (registry client) → miss provider → miss
 * filesystem mounted at ROOT/miss.
 */
import path from 'node:path';
import { describeError, invalidArgument } from '../errors.js';
import { parseSwitch } from '../switch.js';
import { parseDuration } from '../duration.js';
import { DEFAULT_FETCH_TIMEOUT_MS, Fetcher, type FetchObserver, type FetcherStats } from '../fetcher/fetcher.js';
import { silentLogger, type Logger } from '../log.js';
import { mountMissFs, type MissFsMount } from '../missfs/index.js';
import { openPool, type Pool, type PoolStat } from '../pool/pool.js';
import { PoolScrubber, parseScrubInterval, parseScrubRate, type ScrubState } from '../pool/scrubber.js';
import { formatSize, parseSize } from '../pool/size.js';
import { probeFsVerity, type VerityProbe } from '../pool/verity.js';
import { RegistryClient } from '../registry/client.js';
import { HostsConfig } from '../registry/hosts.js';
import type { RouteCounters } from '../registry/mirrors.js';
import type { MirrorOptions } from '../registry/types.js';
import { BlobCatalog } from './catalog.js';
import { LazyMissProvider } from './provider.js';
import { noteReadAhead } from './read-ahead-note.js';
import { callerResolver } from '../stats/callers.js';
import { UsageTracker } from '../stats/usage.js';

/** LazyOptions.fuseOpen. */
export type FuseOpenMode = 'passthrough' | 'none';
export const FUSE_OPEN_MODES: readonly FuseOpenMode[] = ['passthrough', 'none'];

export function parseFuseOpen(v: string, what = 'fuse open mode'): FuseOpenMode {
  const m = v.trim().toLowerCase();
  if ((FUSE_OPEN_MODES as readonly string[]).includes(m)) return m as FuseOpenMode;
  throw invalidArgument(`${what}: "${v}" is not one of ${FUSE_OPEN_MODES.join(', ')}`);
}

export interface LazyOptions {
  /** Pool cap, bytes or "20GiB". Default: GEAR_CACHE_SIZE, else the previous run's, else 20GiB. */
  cacheSize?: string | number;
  /** Fetch deadline in ms. Default: GEAR_FETCH_TIMEOUT, else 60 s. */
  fetchTimeoutMs?: number;
  /** Downloads in flight. Default 8. */
  maxFetches?: number;
  /** Registries reachable over plain http (besides loopback). Default: GEAR_INSECURE_REGISTRIES (comma separated). */
  insecureRegistries?: string[];
  /** Registry mirrors (hosts.toml directory, Docker Hub mirrors). Default: none. */
  mirrors?: MirrorOptions;
  /** Docker config.json with registry credentials. Default: the registry client's ($DOCKER_CONFIG, ~/.docker). */
  dockerConfigPath?: string;
  /**
   * FUSE passthrough: reads of files already in the pool go from the kernel straight to the pool
   * file. Default true (off when the kernel lacks it). It makes the miss filesystem a stacked
   * filesystem, so container roots are at overlay's maximum stacking depth: an overlay whose
   * layers live on a container's root filesystem cannot be mounted inside it.
   */
  fusePassthrough?: boolean;
  /**
   * How opens of Gear files reach the daemon (missfs/implicit-files.ts): "passthrough" (one OPEN
   * request per open; a fetched file's reads then go to the pool file in the kernel) or "none" (no
   * request per open: the kernel keeps a file's pages cached across opens, so a file read again
   * in the same container reads at page-cache speed; the first read of each page comes through
   * the daemon). Default: GEAR_FUSE_OPEN, else "none" (bench/README.md, re-read: passthrough re-read
   * small files at 0.77-0.78x of overlay2, none at 0.99-1.02x).
   */
  fuseOpen?: FuseOpenMode;
  /** Mount the miss filesystem at ROOT/miss. Default true. */
  mountMissFs?: boolean;
  /**
   * Files at least this big are streamed: served while they download, far reads by HTTP Range
   * (provider.ts). Bytes or "8MiB". Default: GEAR_STREAM_MIN_SIZE, else 8 MiB.
   */
  streamMinSize?: number | string;
  /** Pool scrub rate, bytes/s or "50MiB". Default: GEAR_SCRUB_RATE, else 50 MiB/s. */
  scrubRate?: number | string;
  /** Pool scrub interval in ms or "24h"; 0 = no periodic scrub. Default: GEAR_SCRUB_INTERVAL, else 24 h. */
  scrubInterval?: number | string;
  /** Told of every download's end (metrics). */
  onFetchDone?: FetchObserver;
  /** Format v3 read-ahead of a pack member miss, bytes or "1MiB"; 0 = off. Default: GEAR_READ_AHEAD, else 128 KiB (provider.ts). */
  readAhead?: number | string;
  /** Complete each index layer's image into the pool at low priority (completion.ts). Default: GEAR_BACKGROUND_FETCH, else off. */
  backgroundFetch?: boolean;
}

export interface LazyRuntime {
  readonly pool: Pool;
  readonly fetcher: Fetcher;
  readonly catalog: BlobCatalog;
  readonly miss: MissFsMount | undefined;
  readonly scrubber: PoolScrubber;
  /** What this run fetched and containers needed, per digest and container (gear stats). */
  readonly usage: UsageTracker;
  /** Images are completed in the background (LazyOptions.backgroundFetch). */
  readonly backgroundFetch: boolean;
  status(): Array<[string, string]>;
  stats(): { pool: PoolStat; fetch: FetcherStats; miss: ReturnType<MissFsMount['stats']> | undefined; scrub: ScrubState; registry?: RouteCounters | undefined };
  close(): Promise<void>;
}

export async function openLazyRuntime(root: string, opts: LazyOptions, logger: Logger = silentLogger()): Promise<LazyRuntime> {
  const env = process.env;
  const capBytes = opts.cacheSize ?? (env.GEAR_CACHE_SIZE || undefined);
  const timeoutMs = opts.fetchTimeoutMs ?? (env.GEAR_FETCH_TIMEOUT ? parseDuration(env.GEAR_FETCH_TIMEOUT, 'GEAR_FETCH_TIMEOUT') : undefined);
  const insecure =
    opts.insecureRegistries ??
    (env.GEAR_INSECURE_REGISTRIES ?? '')
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
  // Settings are checked before anything is opened: a bad value fails the start with its name.
  const scrubRate = parseScrubRate(opts.scrubRate ?? (env.GEAR_SCRUB_RATE || '50MiB'), opts.scrubRate !== undefined ? 'scrub rate' : 'GEAR_SCRUB_RATE');
  const scrubIntervalMs = parseScrubInterval(opts.scrubInterval ?? (env.GEAR_SCRUB_INTERVAL || '24h'), opts.scrubInterval !== undefined ? 'scrub interval' : 'GEAR_SCRUB_INTERVAL');
  const backgroundFetch = opts.backgroundFetch ?? parseSwitch(env.GEAR_BACKGROUND_FETCH, 'GEAR_BACKGROUND_FETCH');
  if (opts.mirrors) {
    // A broken hosts.toml or mirror URL fails the start, naming the file and line (and is refused again at use).
    const n = await new HostsConfig({ ...opts.mirrors, allowsHttp: () => false }).validate();
    logger.info({ configDir: opts.mirrors.configDir ?? null, hostsFiles: n, dockerHubMirrors: opts.mirrors.dockerHubMirrors ?? [] }, 'registry mirrors');
  }
  const pool = await openPool({ root, logger, ...(capBytes !== undefined ? { capBytes } : {}) });
  let verity: VerityProbe | null = null;
  try {
    verity = await probeFsVerity(path.join(pool.dir, '.staging'));
  } catch (err) {
    logger.warn({ err: describeError(err) }, 'pool: cannot probe fs-verity support');
  }
  const scrubber = await PoolScrubber.start({ pool, rate: scrubRate, intervalMs: scrubIntervalMs, verity, logger });
  logger.info({ integrity: scrubber.status()[0]![1] }, 'pool integrity');
  const fetcherTimeout = timeoutMs ?? DEFAULT_FETCH_TIMEOUT_MS;
  const client = new RegistryClient({
    insecureRegistries: insecure,
    ...(opts.dockerConfigPath ? { dockerConfigPath: opts.dockerConfigPath } : {}),
    ...(opts.mirrors ? { mirrors: opts.mirrors } : {}),
    // Request retries must fit in the fetch deadline.
    retry: { maxTotalMs: Math.max(1000, Math.floor(fetcherTimeout * 0.8)) },
  });
  const usage = new UsageTracker({ resolveCaller: callerResolver(path.resolve(root)) });
  // Set once the miss filesystem is mounted (below).
  let dropUnverified: ((hex: string) => void) | undefined;
  const onFetchDone: FetchObserver = (outcome, seconds, bytes, digest) => {
    usage.noteFetch(outcome, bytes, digest);
    // Whatever ended a download before it verified, the pages it served (a streamed file) are unverified.
    if (outcome !== 'ok' && digest) dropUnverified?.(digest.slice(7));
    opts.onFetchDone?.(outcome, seconds, bytes, digest);
  };
  const fetcher = new Fetcher({
    pool,
    client,
    logger,
    timeoutMs: fetcherTimeout,
    ...(opts.maxFetches ? { maxParallel: opts.maxFetches } : {}),
    onFetchDone,
  });
  const catalog = new BlobCatalog();
  const streamMin = opts.streamMinSize ?? (env.GEAR_STREAM_MIN_SIZE || undefined);
  const readAhead = opts.readAhead ?? (env.GEAR_READ_AHEAD || undefined);
  const fuseOpen = opts.fuseOpen ?? parseFuseOpen(env.GEAR_FUSE_OPEN || 'none', 'GEAR_FUSE_OPEN');
  const provider = new LazyMissProvider({
    pool,
    fetcher,
    catalog,
    logger,
    usage,
    ...(streamMin !== undefined ? { streamMinBytes: parseSize(streamMin) } : {}),
    ...(readAhead !== undefined ? { readAheadBytes: parseSize(readAhead) } : {}),
  });
  // For gear prefetch --from-pool: a pool filled with read-ahead on also holds files nobody opened.
  await noteReadAhead(pool.dir, provider.readAhead.baseBytes).catch((err: unknown) => logger.warn({ err: describeError(err) }, 'could not note the read-ahead in the pool directory'));
  let miss: MissFsMount | undefined;
  let missError: string | undefined;
  if (opts.mountMissFs ?? true) {
    try {
      miss = await mountMissFs({
        mountpoint: path.join(root, 'miss'),
        provider,
        logger,
        passthrough: opts.fusePassthrough ?? true,
        noOpen: fuseOpen === 'none',
        // A little above the fetch deadline: the fetcher answers first, with a precise error.
        requestTimeoutMs: fetcherTimeout + 5_000,
      });
    } catch (err) {
      // Degrade, do not fail: ordinary layers and cached Gear files keep working;
      // uncached Gear files then fail with EIO (status says why).
      missError = describeError(err);
      logger.error({ err: missError }, 'cannot mount the miss filesystem: lazy pull is off (uncached Gear files will fail with EIO)');
    }
  }
  if (miss) dropUnverified = (hex) => miss?.dropUnverified(hex);
  // A scrub removed a corrupt pool file: the miss filesystem must not keep serving that inode
  // through a lingering passthrough registration (the next open then fetches it again).
  pool.onCorruptRemoved((digest) => {
    if (miss && !miss.dropBacking(digest.slice(7))) {
      logger.warn({ digest }, 'scrub: a container still has the removed file open through the miss filesystem; its new opens read the old copy until those are closed');
    }
  });
  let closing: Promise<void> | undefined;
  return {
    pool,
    fetcher,
    catalog,
    miss,
    scrubber,
    usage,
    backgroundFetch,
    stats: () => ({ pool: pool.stat(), fetch: fetcher.stats(), miss: miss?.stats(), scrub: scrubber.stats(), registry: client.routeCounters() }),
    status(): Array<[string, string]> {
      const p = pool.stat();
      const f = fetcher.stats();
      return [
        ['Lazy Pull', miss ? 'on (miss filesystem mounted)' : missError ? `off (miss filesystem: ${missError.slice(0, 200)})` : 'off'],
        ...(miss
          ? [
              ['FUSE Opens', miss.stats().noOpen ? 'none (the kernel opens files alone; pages cached across opens)' : 'one request per open'] as [string, string],
              ['FUSE Passthrough', miss.stats().passthrough ? 'on' : 'off'] as [string, string],
            ]
          : []),
        ['Gear Files Known', String(catalog.files)],
        ['Pool', `${p.files} files, ${formatSize(p.bytes)} of ${formatSize(p.capBytes)}`],
        ['Pool Evictions', `${p.counters.evictions} files, ${formatSize(p.counters.evictedBytes)}`],
        ...scrubber.status(),
        ['Fetched Files', String(f.files)],
        ['Fetched Bytes', String(f.bytes)],
        ['Fetch Failures', `${f.failures} (${f.verifyFailures} rejected by verification, ${f.timeouts} deadlines)`],
        ['Fetches In Flight', `${f.running} running, ${f.queued} queued, max ${fetcher.maxParallel}`],
        ['Fetch Timeout', `${fetcher.timeoutMs} ms`],
        ['Streamed Opens', `${f.streams} (big files; ${f.rangeRequests} range reads, ${formatSize(f.rangeBytes)})`],
        ['Pack Requests', `${f.packRequests} (format v3: ${f.packMembers} files; read-ahead ${formatSize(provider.readAhead.baseBytes)} to ${formatSize(provider.readAhead.maxBytes)} per miss, directories up to ${formatSize(provider.readAhead.dirBytes)})`],
        ...mirrorStatus(client),
      ];
    },
    close(): Promise<void> {
      closing ??= (async () => {
        await scrubber.close();
        await fetcher.close();
        if (miss) {
          await miss.unmount({ timeoutMs: 2_000 }).catch((err: unknown) => logger.warn({ err: describeError(err) }, 'miss filesystem unmount'));
        }
        await client.close().catch(() => undefined);
        await pool.close();
      })();
      return closing;
    },
  };
}

/** A `docker info` line of mirror use, when mirrors are configured. */
function mirrorStatus(client: RegistryClient): Array<[string, string]> {
  const c = client.routeCounters();
  if (!c) return [];
  const m = c.mirror;
  return [['Registry Mirrors', `${m.ok} served, ${m.not_found} not found, ${m.failed} failed (fell through ${c.fallthroughs} times)`]];
}
