/**
 * The systems of the cold-deploy comparison (issue 11) and its side-by-side
 * table: per link and image the median pull, run and deploy seconds, bytes
 * received and registry requests of every system, geomeans over the images,
 * and Gear's ratios to its peers.
 *
 *   overlay2      the Docker image (gzip layers) on dockerd's overlay2
 *   gear          the Gear image, no prefetch list (purely lazy), on `gear daemon`
 *   gear-opt      the Gear image with a prefetch list recorded from one run of the
 *                 task (`gear prefetch --from-pool`)
 *   estargz       `ctr-remote image convert --estargz --oci`, on containerd 1.6 +
 *                 our stargz snapshotter (bench/estargz)
 *   estargz-opt   `ctr-remote image optimize --oci` (the files the task read first,
 *                 prefetched), same stack
 *   gear-ctr      the gear image on containerd 1.6 + `gear snapshotter`, deployed
 *   gear-opt-ctr  with ctr like eStargz (`ctr image pull --snapshotter gear` +
 *                 `ctr run`): the same stack as the peer, so that the ratios
 *                 to eStargz separate the format from dockerd's overheads
 *
 * Ratios are plain quotients, Gear's figure over the peer's (< 1 = Gear
 * smaller or faster), for like-for-like pairs: gear-opt ÷ estargz-opt (both
 * optimized from one recorded run), gear ÷ estargz (both purely lazy), the
 * same two through containerd (gear-opt-ctr, gear-ctr: the peer's stack), and
 * gear-opt ÷ overlay2 (the shipped Gear setup against plain Docker).
 */
import { median } from './stats.js';

export const SYSTEMS = ['overlay2', 'gear', 'gear-opt', 'gear-ctr', 'gear-opt-ctr', 'estargz', 'estargz-opt'] as const;
export type System = (typeof SYSTEMS)[number];

export const isDockerd = (s: System): boolean => s === 'overlay2' || s === 'gear' || s === 'gear-opt';
export const isEstargz = (s: System): boolean => s === 'estargz' || s === 'estargz-opt';
export const isGearCtr = (s: System): boolean => s === 'gear-ctr' || s === 'gear-opt-ctr';
/** Systems that deploy a Gear image (through dockerd or containerd). */
export const isGear = (s: System): boolean => s === 'gear' || s === 'gear-opt' || isGearCtr(s);
/** Systems that deploy the Gear image with its prefetch list. */
export const isGearOpt = (s: System): boolean => s === 'gear-opt' || s === 'gear-opt-ctr';

/** The order of repetition rep: the system list rotated by rep, so no system always goes first. */
export function systemOrder(systems: readonly System[], rep: number): System[] {
  const k = rep % systems.length;
  return [...systems.slice(k), ...systems.slice(0, k)];
}

export const RATIOS: [System, System][] = [
  ['gear-opt', 'estargz-opt'],
  ['gear', 'estargz'],
  ['gear-opt-ctr', 'estargz-opt'],
  ['gear-ctr', 'estargz'],
  ['gear-opt', 'overlay2'],
];

export const METRICS = [
  ['pull', 's'],
  ['run', 's'],
  ['deploy', 's'],
  ['rx', 'bytes'],
  ['requests', 'n'],
] as const;
export type MetricKey = (typeof METRICS)[number][0];

/** Raw samples: link → image → metric → system → samples (in repetition order). */
export type Samples = Record<string, Record<string, Partial<Record<MetricKey, Partial<Record<System, number[]>>>>>>;

export class SystemSamples {
  readonly samples: Samples = {};

  add(link: string, image: string, metric: MetricKey, s: System, v: number): void {
    const byImage = (this.samples[link] ??= {});
    const byMetric = (byImage[image] ??= {});
    const bySystem = (byMetric[metric] ??= {});
    (bySystem[s] ??= []).push(v);
  }

  median(link: string, image: string, metric: MetricKey, s: System): number | undefined {
    const xs = this.samples[link]?.[image]?.[metric]?.[s];
    return xs?.length ? median(xs) : undefined;
  }

  /** Geomean over the images that have a sample for every one of systems. */
  geomeans(link: string, metric: MetricKey, systems: readonly System[]): { images: string[]; values: Partial<Record<System, number>> } {
    const images = Object.keys(this.samples[link] ?? {}).filter((i) => systems.every((s) => this.median(link, i, metric, s) !== undefined));
    const values: Partial<Record<System, number>> = {};
    if (images.length === 0) return { images, values };
    for (const s of systems) {
      // A zero (e.g. no requests) would sink a geomean: floor at a tiny positive value.
      values[s] = Math.exp(images.reduce((a, i) => a + Math.log(Math.max(this.median(link, i, metric, s)!, 1e-9)), 0) / images.length);
    }
    return { images, values };
  }
}

const fmt = (v: number | undefined, unit: string): string => {
  if (v === undefined || !Number.isFinite(v)) return '-';
  if (unit === 'bytes') return v >= 1e6 ? `${(v / 1e6).toFixed(1)} MB` : v >= 1e3 ? `${(v / 1e3).toFixed(0)} kB` : `${v.toFixed(0)} B`;
  if (unit === 'n') return v >= 100 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, '');
  return `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} s`;
};

function grid(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  const line = (r: string[]) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ');
  return [line(rows[0]!), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.slice(1).map(line)].join('\n');
}

/** The side-by-side table, one block per link. */
export function systemsTable(data: SystemSamples, systems: readonly System[]): string {
  const ratios = RATIOS.filter(([a, b]) => systems.includes(a) && systems.includes(b));
  const out: string[] = [];
  for (const link of Object.keys(data.samples)) {
    const rows: string[][] = [[`${link}: median of each system`, ...systems, ...ratios.map(([a, b]) => `${a}/${b}`)]];
    const ratioCells = (get: (s: System) => number | undefined) =>
      ratios.map(([a, b]) => {
        const x = get(a);
        const y = get(b);
        return x !== undefined && y !== undefined && y > 0 ? `${(x / y).toFixed(2)}x` : '-';
      });
    for (const image of Object.keys(data.samples[link]!)) {
      for (const [metric, unit] of METRICS) {
        const get = (s: System) => data.median(link, image, metric, s);
        if (systems.every((s) => get(s) === undefined)) continue;
        rows.push([`${image} ${metric}`, ...systems.map((s) => fmt(get(s), unit)), ...ratioCells(get)]);
      }
    }
    for (const [metric, unit] of METRICS) {
      const g = data.geomeans(link, metric, systems);
      if (!g.images.length) continue;
      rows.push([`GEOMEAN ${metric} (${g.images.length} images)`, ...systems.map((s) => fmt(g.values[s], unit)), ...ratioCells((s) => g.values[s])]);
    }
    out.push(grid(rows));
  }
  out.push(
    [
      'pull: docker pull | ctr image pull | ctr-remote image rpull; run: the first docker run --rm | ctr run --rm of the task; deploy = pull + run.',
      'rx: bytes the node received over the veth (IP headers included); requests: HTTP requests in the registry access log.',
      'ratios: Gear over its peer (< 1 = Gear smaller or faster).',
    ].join('\n'),
  );
  return out.join('\n\n');
}

export interface PublishRow {
  image: string;
  /** Uncompressed input of the conversion: the layer tars of the docker save archive. */
  inputBytes?: number;
  gearConvertS?: number;
  gearPrefetchS?: number;
  estargzConvertS?: number;
  estargzOptimizeS?: number;
}

export function storageTable(storage: Partial<Record<System, { blobs: number; bytes: number }>>, publish: PublishRow[]): string {
  const rows: string[][] = [['registry storage of the corpus', 'blobs', 'bytes']];
  for (const [s, v] of Object.entries(storage)) rows.push([s, String(v.blobs), fmt(v.bytes, 'bytes')]);
  const conv: string[][] = [['conversion (s)', 'input', 'gear convert', 'gear MB/s', 'gear prefetch run', 'estargz convert', 'estargz optimize']];
  for (const p of publish) {
    const mbps = p.inputBytes && p.gearConvertS ? (p.inputBytes / p.gearConvertS / 1e6).toFixed(1) : '-';
    conv.push([p.image, fmt(p.inputBytes, 'bytes'), fmt(p.gearConvertS, 's'), mbps, fmt(p.gearPrefetchS, 's'), fmt(p.estargzConvertS, 's'), fmt(p.estargzOptimizeS, 's')]);
  }
  return `${grid(rows)}\n(unique blobs reachable from each system's tags, manifests and Gear files included; overlay2 = the Docker images)\ninput: the uncompressed layer tars of the docker save archive; gear MB/s = input ÷ gear convert seconds (issue 15 target >= 100 MB/s)\n\n${grid(conv)}`;
}
