/**
 * The `gear stats` report: per Gear index layer and per container, files and
 * bytes of the total that are in the pool, that this daemon run downloaded
 * from a registry, and that containers needed and found already in the pool;
 * the prefetch state of each index layer; the containers on non-Gear images.
 * Computed at query time from the layer records, the pool and the
 * UsageTracker (usage.ts); nothing here runs on a hot path.
 */
import type { NonLazyState } from './nonlazy.js';
import type { UsageTracker } from './usage.js';

export interface Amount {
  files: number;
  bytes: number;
}

export interface PrefetchReport {
  /** none: the index lists no prefetch, or it was applied before this run; running; done (this run). */
  state: 'none' | 'running' | 'done';
  /** Distinct files listed for prefetch. */
  listed: number;
  /** Listed files that were already in the pool when the prefetch started. */
  cached: number;
  /** Listed files the prefetch downloaded. */
  fetched: number;
  failed: number;
  /** Listed files left out because they do not fit under the pool's low watermark. */
  skipped: number;
}

export interface LayerReport {
  id: string;
  /** registry/repository the files come from. */
  location?: string;
  /** Regular files the index lists, and their bytes (duplicates included). */
  listed: Amount;
  /** Distinct contents (Gear files). */
  total: Amount;
  /** Of the distinct contents, in the pool now. */
  inPool: Amount;
  /** Downloaded from a registry by this daemon run (containers' needs, prefetch, resume). */
  fromRegistry: Amount;
  /** Containers' needs that had to go to the registry (LOOKUP misses). */
  neededFromRegistry: Amount;
  /** Containers' needs the miss filesystem found already in the pool (a lower bound: see docs/operations.md). */
  neededFromPool: Amount;
  prefetch: PrefetchReport;
  /** Containers on this index layer. */
  containers: number;
}

export interface ContainerReport {
  /** The container's layer id (graph driver: the id dockerd gave; snapshotter: the core layer). */
  id: string;
  /** The snapshot key (snapshotter), when known. */
  name?: string;
  indexLayer: string;
  /** Files whose download this container's processes caused, and their bytes. */
  fromRegistry: Amount;
  /** Files it needed that the miss filesystem found in the pool. */
  fromPool: Amount;
}

export interface StatsReport {
  root: string;
  /** When this daemon run started counting (ms since the epoch). */
  since: number;
  lazy: boolean;
  totals: { fromRegistry: Amount; neededFromRegistry: Amount; neededFromPool: Amount; fetchFailures: number; pool: Amount };
  layers: LayerReport[];
  containers: ContainerReport[];
  nonLazy: NonLazyState;
  notes: string[];
}

export interface StatsLayer {
  id: string;
  parent: string;
  kind: 'ro' | 'rw';
  gear?: { files: number; bytes: number; location?: { registry: string; repository: string }; blobs: Array<[string, number, ...unknown[]]> };
}

export interface StatsInput {
  root: string;
  since: number;
  layers: Iterable<StatsLayer>;
  pool?: { has(digest: string): boolean; stat(): { files: number; bytes: number } };
  usage?: UsageTracker;
  prefetch?: (layer: string) => { listed: number; cached: number; fetched: number; failed: number; skipped: number; running: boolean } | undefined;
  nonLazy: NonLazyState;
  /**
   * Which layers are containers, and their names (the snapshotter: active snapshots, by key).
   * Default: read-write layers that are not index layers and that no other read-write layer sits on.
   */
  containers?: ReadonlyMap<string, string>;
}

export const STATS_NOTES = [
  'counts start at zero with each daemon start; "in pool" is the pool now',
  'reads of files already in the pool are served by overlay from the pool directly and never reach gear: they are not counted per container',
  'a Gear file shared by several index layers counts in each of them',
];

const amount = (): Amount => ({ files: 0, bytes: 0 });
const add = (a: Amount, bytes: number) => {
  a.files++;
  a.bytes += bytes;
};

export function buildStatsReport(input: StatsInput): StatsReport {
  const byId = new Map<string, StatsLayer>();
  for (const l of input.layers) byId.set(l.id, l);
  const usage = input.usage;
  const sizeOf = new Map<string, number>();
  const layers: LayerReport[] = [];
  for (const l of byId.values()) {
    if (!l.gear) continue;
    const r: LayerReport = {
      id: l.id,
      ...(l.gear.location ? { location: `${l.gear.location.registry}/${l.gear.location.repository}` } : {}),
      listed: { files: l.gear.files, bytes: l.gear.bytes },
      total: amount(),
      inPool: amount(),
      fromRegistry: amount(),
      neededFromRegistry: amount(),
      neededFromPool: amount(),
      prefetch: { state: 'none', listed: 0, cached: 0, fetched: 0, failed: 0, skipped: 0 },
      containers: 0,
    };
    for (const [digest, size] of l.gear.blobs) {
      sizeOf.set(digest, size);
      add(r.total, size);
      if (input.pool?.has(digest)) add(r.inPool, size);
      if (usage?.fetched.has(digest)) add(r.fromRegistry, size);
      if (usage?.misses.has(digest)) add(r.neededFromRegistry, size);
      if (usage?.hits.has(digest)) add(r.neededFromPool, size);
    }
    const p = input.prefetch?.(l.id);
    if (p) r.prefetch = { state: p.running ? 'running' : 'done', listed: p.listed, cached: p.cached, fetched: p.fetched, failed: p.failed, skipped: p.skipped };
    layers.push(r);
  }
  const layerReports = new Map(layers.map((r) => [r.id, r]));

  // Containers: read-write layers on an index layer that no other read-write layer sits on
  // (dockerd's <id>-init layer is the parent of the container's own layer).
  const rwParents = new Set<string>();
  for (const l of byId.values()) if (l.kind === 'rw' && l.parent && byId.get(l.parent)?.kind === 'rw') rwParents.add(l.parent);
  const containers: ContainerReport[] = [];
  for (const l of byId.values()) {
    if (input.containers ? !input.containers.has(l.id) : l.kind !== 'rw' || l.gear || rwParents.has(l.id)) continue;
    let indexLayer: string | undefined;
    let cur: StatsLayer | undefined = l;
    for (let depth = 0; cur && depth < 1024; depth++) {
      if (cur.gear) {
        indexLayer = cur.id;
        break;
      }
      cur = cur.parent ? byId.get(cur.parent) : undefined;
    }
    if (!indexLayer) continue;
    const c: ContainerReport = { id: l.id, indexLayer, fromRegistry: amount(), fromPool: amount() };
    const name = input.containers?.get(l.id);
    if (name) c.name = name;
    const u = usage?.containers.get(l.id);
    for (const d of u?.misses ?? []) add(c.fromRegistry, sizeOf.get(d) ?? usage?.fetched.get(d) ?? 0);
    for (const d of u?.hits ?? []) add(c.fromPool, sizeOf.get(d) ?? 0);
    const lr = layerReports.get(indexLayer);
    if (lr) lr.containers++;
    containers.push(c);
  }

  const totals: StatsReport['totals'] = { fromRegistry: amount(), neededFromRegistry: amount(), neededFromPool: amount(), fetchFailures: 0, pool: amount() };
  for (const [, bytes] of usage?.fetched ?? []) add(totals.fromRegistry, bytes);
  for (const d of usage?.misses ?? []) add(totals.neededFromRegistry, sizeOf.get(d) ?? usage?.fetched.get(d) ?? 0);
  for (const d of usage?.hits ?? []) add(totals.neededFromPool, sizeOf.get(d) ?? 0);
  for (const n of usage?.failed.values() ?? []) totals.fetchFailures += n;
  const ps = input.pool?.stat();
  if (ps) totals.pool = { files: ps.files, bytes: ps.bytes };
  return {
    root: input.root,
    since: input.since,
    lazy: !!input.pool,
    totals,
    layers: layers.sort((a, b) => a.id.localeCompare(b.id)),
    containers: containers.sort((a, b) => a.id.localeCompare(b.id)),
    nonLazy: input.nonLazy,
    notes: STATS_NOTES,
  };
}
