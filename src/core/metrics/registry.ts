/**
 * Gear's Prometheus metrics (prom-client). Nearly everything is read at scrape
 * time from the counters the core already keeps (pool, fetcher, miss
 * filesystem, scrub, prefetch, resume, layer records), so nothing on a hot
 * path pays for metrics; only each download's outcome, latency and size are
 * observed as they happen (fetchObserver, which the fetcher calls).
 *
 * Names follow Prometheus conventions: `gear_` prefix, base units (`_bytes`,
 * `_seconds`), `_total` for counters. Label values come from small fixed sets
 * (an outcome, an opcode, a state): never a digest, a path or a layer id.
 * docs/operations.md lists every metric with its meaning.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { FetchObserver, FetcherStats } from '../fetcher/fetcher.js';
import type { MissFsStats } from '../missfs/types.js';
import type { PoolStat } from '../pool/pool.js';
import type { ScrubState } from '../pool/scrubber.js';
import type { RouteCounters } from '../registry/mirrors.js';

/** What the metrics read at each scrape; each part may be absent (no lazy runtime, no store yet). */
export interface MetricSources {
  lazy?: () => { pool: PoolStat; fetch: FetcherStats; miss: MissFsStats | undefined; scrub: ScrubState; registry?: RouteCounters | undefined } | undefined;
  layers?: () => { layers: number; indexLayers: number } | undefined;
  prefetch?: () => { layers: number; files: number; done: number; failed: number; running: number } | undefined;
  resume?: () => { state: string; total: number; inPool: number; left: number; failed: number } | undefined;
  backgroundFetch?: () => { files: number; fetched: number; bytes: number; failed: number; running: number } | undefined;
  nonLazy?: () => { started: number; refused: number; requireLazy: boolean } | undefined;
}

export interface GearMetrics {
  readonly registry: Registry;
  /** Hand this to the fetcher: it observes the latency and size of every download. */
  readonly fetchObserver: FetchObserver;
}

const RESUME_STATES = ['idle', 'running', 'done', 'stopped'] as const;

/** A counter whose value is read from a source at scrape time (monotonic in the source). */
function readCounter(registry: Registry, name: string, help: string, read: () => number | undefined): void {
  new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      const v = read();
      this.reset();
      if (v !== undefined && Number.isFinite(v) && v > 0) this.inc(v);
    },
  });
}

function readGauge(registry: Registry, name: string, help: string, read: () => number | undefined): void {
  new Gauge({
    name,
    help,
    registers: [registry],
    collect() {
      const v = read();
      if (v === undefined || !Number.isFinite(v)) this.reset();
      else this.set(v);
    },
  });
}

export function createGearMetrics(sources: MetricSources): GearMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const lazy = () => sources.lazy?.();
  const pool = () => lazy()?.pool;
  const fetch = () => lazy()?.fetch;
  const miss = () => lazy()?.miss;

  readGauge(registry, 'gear_pool_bytes', 'Bytes of Gear files in the node pool (level 1).', () => pool()?.bytes);
  readGauge(registry, 'gear_pool_files', 'Gear files in the node pool.', () => pool()?.files);
  readGauge(registry, 'gear_pool_capacity_bytes', 'Cap of the node pool (GEAR_CACHE_SIZE); eviction starts above its high watermark.', () => pool()?.capBytes);
  readGauge(registry, 'gear_pool_referenced_bytes', 'Bytes of pool files that some index layer on this node names.', () => pool()?.referencedBytes);
  readCounter(registry, 'gear_pool_evictions_total', 'Pool files removed by LRU eviction or prune.', () => pool()?.counters.evictions);
  readCounter(registry, 'gear_pool_evicted_bytes_total', 'Bytes removed from the pool by eviction or prune.', () => pool()?.counters.evictedBytes);
  readCounter(
    registry,
    'gear_pool_hits_total',
    'Needs of a file that reached the miss filesystem and found it in the pool (opens overlay serves from the pool itself are not seen).',
    () => pool()?.counters.hits,
  );
  readCounter(registry, 'gear_pool_misses_total', 'Needs of a file that was not in the pool and had to be fetched (a cold fetch is a miss).', () => pool()?.counters.misses);

  const fetches = new Counter({
    name: 'gear_fetches_total',
    help: 'Downloads of Gear files by outcome: ok, verify_failed (content did not match its digest), deadline (--fetch-timeout), http_error (the registry answered an error status), error (any other failure: connection, disk).',
    labelNames: ['outcome'],
    registers: [registry],
  });
  for (const outcome of ['ok', 'verify_failed', 'deadline', 'http_error', 'error']) fetches.labels({ outcome }).inc(0);
  // Pull requests (manifests, blobs, ranges) by the host that answered: a mirror or the registry itself (origin).
  new Counter({
    name: 'gear_registry_requests_total',
    help: 'Registry pull requests (manifests, blobs, range reads) by host role (mirror, origin) and outcome: ok, not_found (404: the next host is tried), failed (refused, 5xx, timeout, wrong bytes: a mirror then falls through and is put behind the origin for a while). Counted only when mirrors are configured.',
    labelNames: ['role', 'outcome'],
    registers: [registry],
    collect() {
      const c = lazy()?.registry;
      this.reset();
      for (const role of ['mirror', 'origin'] as const) {
        for (const outcome of ['ok', 'not_found', 'failed'] as const) this.labels({ role, outcome }).inc(c ? c[role][outcome] : 0);
      }
    },
  });
  readCounter(registry, 'gear_fetch_deadline_exceeded_total', 'Reads whose wait for a download hit --fetch-timeout (the reader got EIO).', () => fetch()?.timeouts);
  readCounter(registry, 'gear_fetch_received_bytes_total', 'Bytes received from registries for Gear files (compressed size for gzip blobs).', () => fetch()?.blobBytes);
  readCounter(registry, 'gear_fetch_content_bytes_total', 'Content bytes that entered the pool through the fetcher.', () => fetch()?.bytes);
  readCounter(registry, 'gear_fetch_joined_total', 'Needs that joined a download already in flight or queued.', () => fetch()?.joined);
  readCounter(registry, 'gear_fetch_range_requests_total', 'HTTP range reads of streamed big files.', () => fetch()?.rangeRequests);
  readCounter(registry, 'gear_fetch_streams_total', 'Streamed opens of big files.', () => fetch()?.streams);
  readGauge(registry, 'gear_fetches_in_flight', 'Downloads running now.', () => fetch()?.running);
  readGauge(registry, 'gear_fetches_queued', 'Downloads waiting for a slot (--max-fetches).', () => fetch()?.queued);

  const duration = new Histogram({
    name: 'gear_fetch_duration_seconds',
    help: 'Time from the start of a download to its end (verified in the pool, or failed), by outcome: ok, verify_failed, deadline, http_error, error.',
    labelNames: ['outcome'],
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [registry],
  });
  const size = new Histogram({
    name: 'gear_fetch_size_bytes',
    help: 'Content bytes of each successful download.',
    buckets: [1024, 16_384, 131_072, 1_048_576, 8_388_608, 67_108_864, 536_870_912],
    registers: [registry],
  });

  // FUSE requests by opcode, from the miss filesystem's counters.
  new Counter({
    name: 'gear_fuse_requests_total',
    help: 'Requests of the miss filesystem (FUSE) by opcode; "static" are fixed replies the reader thread gives, "other" the rest.',
    labelNames: ['opcode'],
    registers: [registry],
    collect() {
      const m = miss();
      this.reset();
      if (!m) return;
      const known = m.lookups + m.opens + m.reads + m.interrupts + m.forgets;
      this.labels({ opcode: 'LOOKUP' }).inc(m.lookups);
      this.labels({ opcode: 'OPEN' }).inc(m.opens);
      this.labels({ opcode: 'READ' }).inc(m.reads);
      this.labels({ opcode: 'INTERRUPT' }).inc(m.interrupts);
      this.labels({ opcode: 'FORGET' }).inc(m.forgets);
      this.labels({ opcode: 'static' }).inc(m.staticReplies);
      this.labels({ opcode: 'other' }).inc(Math.max(0, m.requests - known));
    },
  });
  readCounter(registry, 'gear_fuse_passthrough_opens_total', 'Opens answered with FUSE passthrough (the kernel then reads the pool file itself).', () => miss()?.passthroughOpens);
  readCounter(registry, 'gear_fuse_lookup_errors_total', 'LOOKUPs answered with an error.', () => miss()?.lookupErrors);
  readCounter(registry, 'gear_fuse_read_bytes_total', 'Bytes served by READ requests (not passthrough).', () => miss()?.bytesRead);
  readCounter(registry, 'gear_fuse_request_timeouts_total', 'Requests answered EIO because they outlived the request timeout.', () => miss()?.timeouts);
  readGauge(registry, 'gear_fuse_open_files', 'Files open through the miss filesystem.', () => miss()?.openFiles);
  readGauge(registry, 'gear_fuse_requests_in_flight', 'Miss filesystem requests being served.', () => miss()?.inflight);

  readGauge(registry, 'gear_layers', 'Layers (and snapshots) known to the layer store.', () => sources.layers?.()?.layers);
  readGauge(registry, 'gear_index_layers', 'Gear index layers known to the layer store (lazy images).', () => sources.layers?.()?.indexLayers);

  readGauge(registry, 'gear_prefetch_listed_files', 'Files the prefetch lists of this run name (and the pool cap admits).', () => sources.prefetch?.()?.files);
  readGauge(registry, 'gear_prefetch_done_files', 'Listed files now in the pool.', () => sources.prefetch?.()?.done);
  readGauge(registry, 'gear_prefetch_failed_files', 'Listed files whose prefetch failed.', () => sources.prefetch?.()?.failed);
  readGauge(registry, 'gear_prefetch_running_layers', 'Index layers still prefetching.', () => sources.prefetch?.()?.running);

  readGauge(registry, 'gear_background_fetch_files', 'Files of the index layers of this run that background fetch found missing from the pool (GEAR_BACKGROUND_FETCH=on).', () => sources.backgroundFetch?.()?.files);
  readGauge(registry, 'gear_background_fetch_done_files', 'Of those, files background fetch put into the pool.', () => sources.backgroundFetch?.()?.fetched);
  readGauge(registry, 'gear_background_fetch_done_bytes', 'Content bytes background fetch put into the pool.', () => sources.backgroundFetch?.()?.bytes);
  readGauge(registry, 'gear_background_fetch_failed_files', 'Files background fetch could not fetch (left to a later open).', () => sources.backgroundFetch?.()?.failed);
  readGauge(registry, 'gear_background_fetch_running_layers', 'Index layers background fetch is still completing.', () => sources.backgroundFetch?.()?.running);

  readGauge(registry, 'gear_resume_files', 'Files of the index layers that containers used at start (crash resume).', () => sources.resume?.()?.total);
  readGauge(registry, 'gear_resume_done_files', 'Of those, files in the pool.', () => sources.resume?.()?.inPool);
  readGauge(registry, 'gear_resume_left_files', 'Of those, files still to fetch.', () => sources.resume?.()?.left);
  new Gauge({
    name: 'gear_resume_state',
    help: 'State of the crash resume: 1 for the current state.',
    labelNames: ['state'],
    registers: [registry],
    collect() {
      const r = sources.resume?.();
      for (const s of RESUME_STATES) this.labels({ state: s }).set(r?.state === s ? 1 : 0);
    },
  });

  readCounter(registry, 'gear_scrub_runs_total', 'Pool scrubs run since the first one.', () => lazy()?.scrub.totals.runs);
  readCounter(registry, 'gear_scrub_bad_files_total', 'Pool files found altered at rest by scrubs since the first run.', () => lazy()?.scrub.totals.bad);
  readCounter(registry, 'gear_scrub_removed_files_total', 'Altered pool files that scrubs removed (they are fetched again on their next use).', () => lazy()?.scrub.totals.removed);

  readCounter(
    registry,
    'gear_nonlazy_containers_total',
    'Containers started on an image without a Gear index layer (nothing of them is lazy or deduplicated; convert the image with gear convert).',
    () => sources.nonLazy?.()?.started,
  );
  readCounter(registry, 'gear_nonlazy_containers_refused_total', 'Containers on an image without a Gear index layer refused by --require-lazy.', () => sources.nonLazy?.()?.refused);
  readGauge(registry, 'gear_require_lazy', '1 when --require-lazy refuses containers on non-Gear images, else 0.', () => {
    const s = sources.nonLazy?.();
    return s ? (s.requireLazy ? 1 : 0) : undefined;
  });

  const fetchObserver: FetchObserver = (outcome, seconds, bytes) => {
    fetches.labels({ outcome }).inc();
    duration.labels({ outcome }).observe(seconds);
    if (outcome === 'ok') size.observe(bytes);
  };
  return { registry, fetchObserver };
}
