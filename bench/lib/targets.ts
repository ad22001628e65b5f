/**
 * Issue 15's targets, computed from one run's samples (report.extra of the
 * sections), each PASS or FAIL with its numbers, or "not measured" when the
 * run did not measure what it needs (never PASS then). Printed at the end of
 * a run and kept in the results JSON under extra.targets.
 *
 * Sources: extra['cold-deploy'] (systemSamples: link → image → metric →
 * system → samples; storage; publish: conversion seconds and input bytes),
 * extra.series (lib/series.ts: storage after each version, warm second
 * version), extra.reread (lib/reread.ts: second-read throughput ratios).
 * Medians of the samples per image and system, as the side-by-side table.
 */
import { median } from './stats.js';
import type { Samples, System } from './systems.js';

export type Verdict = 'PASS' | 'FAIL' | 'not measured';

export interface TargetRow {
  id: string;
  /** The target as issue 15 states it. */
  target: string;
  verdict: Verdict;
  /** The measured figure (worst case where the target is "on every image"). */
  value: string;
  /** Per image (or per item) figures behind the value. */
  details?: Record<string, number>;
}

const TARGET_LINK = '100mbit';
const GEAR_SYSTEMS: System[] = ['gear', 'gear-opt', 'gear-ctr', 'gear-opt-ctr'];

interface ColdExtra {
  systemSamples?: Samples;
  storage?: Partial<Record<System, { bytes: number }>>;
  publish?: Record<string, { gearConvertSeconds?: number; inputBytes?: number }>;
}
interface SeriesExtra {
  versions?: number;
  storage?: Partial<Record<string, { bytes: number }[]>>;
  warm?: { gearV2Rx?: number; overlay2ColdV2Rx?: number };
  convert?: { version: number; seconds: number; inputBytes: number }[];
}
interface RereadExtra {
  ratios?: Partial<Record<string, Record<string, number>>>;
}

const notMeasured = (id: string, target: string, why: string): TargetRow => ({ id, target, verdict: 'not measured', value: why });

function med(s: Samples | undefined, link: string, image: string, metric: string, sys: System): number | undefined {
  const xs = (s?.[link]?.[image] as Record<string, Partial<Record<System, number[]>>> | undefined)?.[metric]?.[sys];
  return xs?.length ? median(xs) : undefined;
}

/** a ÷ b per image on link (both measured), worst (largest) first in the value. */
function perImageRatio(
  id: string,
  target: string,
  s: Samples | undefined,
  link: string,
  metric: string,
  a: System,
  b: System,
  max: number,
  linkB = link,
): TargetRow {
  const details: Record<string, number> = {};
  for (const image of Object.keys(s?.[link] ?? {})) {
    const x = med(s, link, image, metric, a);
    const y = med(s, linkB, image, metric, b);
    if (x !== undefined && y !== undefined && y > 0) details[image] = x / y;
  }
  const images = Object.keys(details);
  if (!images.length) return notMeasured(id, target, `no image with both ${a}${link === linkB ? '' : ` on ${link}`} and ${b}${link === linkB ? ` on ${link}` : ` on ${linkB}`}`);
  const worst = images.reduce((w, i) => (details[i]! > details[w]! ? i : w));
  return {
    id,
    target,
    verdict: images.every((i) => details[i]! <= max) ? 'PASS' : 'FAIL',
    value: `worst ${details[worst]!.toFixed(2)}x (${worst}), ${images.length} image${images.length === 1 ? '' : 's'}`,
    details,
  };
}

export function issue15Targets(extra: Record<string, unknown>): TargetRow[] {
  const cold = extra['cold-deploy'] as ColdExtra | undefined;
  const series = extra.series as SeriesExtra | undefined;
  const reread = extra.reread as RereadExtra | undefined;
  const s = cold?.systemSamples;
  const rows: TargetRow[] = [];

  rows.push(perImageRatio('deploy-opt', 'cold deploy 100 Mbit/s: gear-opt <= 0.8x estargz-opt, every image', s, TARGET_LINK, 'deploy', 'gear-opt', 'estargz-opt', 0.8));
  rows.push(perImageRatio('deploy-opt-ctr', 'the same through containerd: gear-opt-ctr <= 0.8x estargz-opt', s, TARGET_LINK, 'deploy', 'gear-opt-ctr', 'estargz-opt', 0.8));
  rows.push(perImageRatio('deploy-lazy', 'cold deploy 100 Mbit/s: gear <= 1.0x estargz, every image', s, TARGET_LINK, 'deploy', 'gear', 'estargz', 1.0));
  rows.push(perImageRatio('deploy-lazy-ctr', 'the same through containerd: gear-ctr <= 1.0x estargz', s, TARGET_LINK, 'deploy', 'gear-ctr', 'estargz', 1.0));

  // Geomean speedup over overlay2 (gear-opt, the image as shipped; gear when no gear-opt was measured).
  for (const g of ['gear-opt', 'gear'] as System[]) {
    const id = `geomean-${g}`;
    const target = `cold deploy 100 Mbit/s: geomean ${g} >= 8x faster than overlay2`;
    const images = Object.keys(s?.[TARGET_LINK] ?? {}).filter((i) => med(s, TARGET_LINK, i, 'deploy', g) !== undefined && med(s, TARGET_LINK, i, 'deploy', 'overlay2') !== undefined);
    if (!images.length) {
      rows.push(notMeasured(id, target, `no image with ${g} and overlay2 on ${TARGET_LINK}`));
      continue;
    }
    const details = Object.fromEntries(images.map((i) => [i, med(s, TARGET_LINK, i, 'deploy', 'overlay2')! / med(s, TARGET_LINK, i, 'deploy', g)!]));
    const gm = Math.exp(images.reduce((a, i) => a + Math.log(details[i]!), 0) / images.length);
    rows.push({ id, target, verdict: gm >= 8 ? 'PASS' : 'FAIL', value: `${gm.toFixed(2)}x over ${images.length} image${images.length === 1 ? '' : 's'}`, details });
  }

  rows.push(perImageRatio('bytes-opt', 'bytes received 100 Mbit/s: gear-opt <= estargz-opt, every image', s, TARGET_LINK, 'rx', 'gear-opt', 'estargz-opt', 1.0));
  rows.push(perImageRatio('bytes-lazy', 'bytes received 100 Mbit/s: gear <= estargz-opt, every image', s, TARGET_LINK, 'rx', 'gear', 'estargz-opt', 1.0));

  // Requests per cold start: every Gear system, image and link measured.
  {
    const id = 'requests';
    const target = 'registry requests per cold start <= 50 (every Gear system, image and link)';
    const details: Record<string, number> = {};
    for (const [link, byImage] of Object.entries(s ?? {})) {
      for (const image of Object.keys(byImage)) {
        if (image.includes(' after ')) continue; // a warm second version, not a cold start
        for (const g of GEAR_SYSTEMS) {
          const v = med(s, link, image, 'requests', g);
          if (v !== undefined) details[`${link} ${image} ${g}`] = v;
        }
      }
    }
    const keys = Object.keys(details);
    if (!keys.length) rows.push(notMeasured(id, target, 'no Gear cold deploy measured'));
    else {
      const worst = keys.reduce((w, k) => (details[k]! > details[w]! ? k : w));
      rows.push({ id, target, verdict: keys.every((k) => details[k]! <= 50) ? 'PASS' : 'FAIL', value: `worst ${details[worst]} (${worst}), ${keys.length} cold starts`, details });
    }
  }

  // +20 ms RTT: rtt20ms (unshaped + 10 ms each way) against unshaped, per Gear system and image.
  {
    const id = 'rtt';
    const target = '+20 ms RTT: deploy <= 1.3x of the same image at 0 ms (rtt20ms vs unshaped, every Gear system)';
    const details: Record<string, number> = {};
    for (const image of Object.keys(s?.rtt20ms ?? {})) {
      for (const g of GEAR_SYSTEMS) {
        const x = med(s, 'rtt20ms', image, 'deploy', g);
        const y = med(s, 'unshaped', image, 'deploy', g);
        if (x !== undefined && y !== undefined && y > 0) details[`${image} ${g}`] = x / y;
      }
    }
    const keys = Object.keys(details);
    if (!keys.length) rows.push(notMeasured(id, target, 'needs the rtt20ms and unshaped links with the same images and Gear systems'));
    else {
      const worst = keys.reduce((w, k) => (details[k]! > details[w]! ? k : w));
      rows.push({ id, target, verdict: keys.every((k) => details[k]! <= 1.3) ? 'PASS' : 'FAIL', value: `worst ${details[worst]!.toFixed(2)}x (${worst})`, details });
    }
  }

  rows.push(perImageRatio('pull-profile', 'pull with a profile within 10% of without: gear-opt pull <= 1.1x gear pull, every image (100 Mbit/s)', s, TARGET_LINK, 'pull', 'gear-opt', 'gear', 1.1));
  rows.push(perImageRatio('pull-profile-ctr', 'the same through containerd: gear-opt-ctr pull <= 1.1x gear-ctr pull', s, TARGET_LINK, 'pull', 'gear-opt-ctr', 'gear-ctr', 1.1));

  // Registry storage of the corpus.
  {
    const id = 'storage';
    const target = 'registry storage of the bench corpus: gear <= overlay2';
    const st = cold?.storage;
    const g = st?.gear ?? st?.['gear-opt'];
    if (!g || !st?.overlay2) rows.push(notMeasured(id, target, 'needs the gear and overlay2 storage of the cold-deploy corpus'));
    else {
      const r = g.bytes / st.overlay2.bytes;
      rows.push({ id, target, verdict: r <= 1 ? 'PASS' : 'FAIL', value: `${(r * 100).toFixed(0)}% (${(g.bytes / 1e6).toFixed(1)} of ${(st.overlay2.bytes / 1e6).toFixed(1)} MB)` });
    }
  }
  {
    const id = 'storage-series';
    const target = 'registry storage of the five-version series: gear <= 50% of overlay2';
    const g = series?.storage?.gear;
    const o = series?.storage?.overlay2;
    if (!g?.length || !o?.length) rows.push(notMeasured(id, target, 'series section not run'));
    else if (g.length < 5 || o.length < 5) rows.push(notMeasured(id, target, `only ${Math.min(g.length, o.length)} version(s) measured`));
    else {
      const r = g[4]!.bytes / o[4]!.bytes;
      rows.push({ id, target, verdict: r <= 0.5 ? 'PASS' : 'FAIL', value: `${(r * 100).toFixed(0)}% (${(g[4]!.bytes / 1e6).toFixed(1)} of ${(o[4]!.bytes / 1e6).toFixed(1)} MB)` });
    }
  }

  // Conversion throughput: uncompressed input bytes (the docker save archive's layer tars) per second of gear convert.
  {
    const id = 'convert';
    const target = 'gear convert >= 100 MB/s of uncompressed input, every image';
    const details: Record<string, number> = {};
    for (const [image, p] of Object.entries(cold?.publish ?? {})) {
      if (p.gearConvertSeconds && p.inputBytes) details[image] = p.inputBytes / p.gearConvertSeconds / 1e6;
    }
    for (const c of series?.convert ?? []) if (c.seconds > 0 && c.inputBytes) details[`series v${c.version}`] = c.inputBytes / c.seconds / 1e6;
    const keys = Object.keys(details);
    if (!keys.length) rows.push(notMeasured(id, target, 'no gear convert with a measured input size'));
    else {
      const worst = keys.reduce((w, k) => (details[k]! < details[w]! ? k : w));
      rows.push({ id, target, verdict: keys.every((k) => details[k]! >= 100) ? 'PASS' : 'FAIL', value: `worst ${details[worst]!.toFixed(1)} MB/s (${worst}), ${keys.length} conversions`, details });
    }
  }

  // Warm second version: the series' v2 on a node that ran v1 (and cold-deploy's pyapp-2 after pyapp-1).
  {
    const id = 'warm-v2';
    const target = 'warm second version: gear bytes <= 2% of a cold overlay2 deploy of it';
    const details: Record<string, number> = {};
    if (series?.warm?.gearV2Rx !== undefined && series.warm.overlay2ColdV2Rx) details['series v2 after v1'] = series.warm.gearV2Rx / series.warm.overlay2ColdV2Rx;
    for (const [link, byImage] of Object.entries(s ?? {})) {
      for (const image of Object.keys(byImage)) {
        const m = / after /.exec(image);
        if (!m) continue;
        const next = image.split(' after ')[0]!;
        const cold2 = med(s, link, next, 'rx', 'overlay2');
        for (const g of GEAR_SYSTEMS) {
          const warm = med(s, link, image, 'rx', g);
          if (warm !== undefined && cold2) details[`${link} ${image} ${g}`] = warm / cold2;
        }
      }
    }
    const keys = Object.keys(details);
    if (!keys.length) rows.push(notMeasured(id, target, 'no warm second version measured'));
    else {
      const worst = keys.reduce((w, k) => (details[k]! > details[w]! ? k : w));
      rows.push({ id, target, verdict: keys.every((k) => details[k]! <= 0.02) ? 'PASS' : 'FAIL', value: `worst ${(details[worst]! * 100).toFixed(2)}% (${worst})`, details });
    }
  }

  // Re-read in the same container after the lazy fetch: the default daemon (--fuse-open none), and with passthrough.
  for (const [id, target, systems] of [
    ['reread', 'a file read again in the same container after its lazy fetch: >= 0.95x overlay2 throughput', ['gear', 'gear-ctr']],
    ['reread-pt', 'the same with --fuse-open passthrough (a request per open; the default before session 15)', ['gear-pt']],
  ] as const) {
    const details: Record<string, number> = {};
    for (const g of systems) for (const [task, r] of Object.entries(reread?.ratios?.[g] ?? {})) details[`${g} ${task}`] = r;
    const keys = Object.keys(details);
    if (!keys.length) rows.push(notMeasured(id, target, 'reread section not run'));
    else {
      const worst = keys.reduce((w, k) => (details[k]! < details[w]! ? k : w));
      rows.push({ id, target, verdict: keys.every((k) => details[k]! >= 0.95) ? 'PASS' : 'FAIL', value: `worst ${details[worst]!.toFixed(2)}x (${worst})`, details });
    }
  }
  return rows;
}

export function targetsTable(rows: TargetRow[]): string {
  const grid = [['issue 15 target', 'result', 'measured'], ...rows.map((r) => [r.target, r.verdict, r.value])];
  const widths = grid[0]!.map((_, c) => Math.max(...grid.map((x) => x[c]!.length)));
  const line = (x: string[]) => x.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd();
  return [line(grid[0]!), widths.map((w) => '-'.repeat(w)).join('  '), ...grid.slice(1).map(line)].join('\n');
}
