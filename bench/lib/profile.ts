/**
 * Where the gear plugin spends time: the daemon logs one line per plugin
 * request at debug level ({msg:'request', method, durationMs}); this groups
 * the lines written since a mark by method.
 */
import { closeSync, openSync, readSync, statSync } from 'node:fs';
import type { Dockerd } from '../../test/helpers/dockerd.js';
import { summarize, type Summary } from './stats.js';

export const gearLogSize = (d: Dockerd): number => (d.logs.gear ? statSync(d.logs.gear).size : 0);

export function gearRequestProfile(d: Dockerd, from: number): Record<string, Summary & { totalMs: number }> {
  if (!d.logs.gear) return {};
  const size = statSync(d.logs.gear).size;
  const buf = Buffer.alloc(Math.max(0, size - from));
  const fd = openSync(d.logs.gear, 'r');
  try {
    readSync(fd, buf, 0, buf.length, from);
  } finally {
    closeSync(fd);
  }
  const by = new Map<string, number[]>();
  for (const line of buf.toString('utf8').split('\n')) {
    if (!line.includes('"request"')) continue;
    try {
      const o = JSON.parse(line) as { msg?: string; method?: string; durationMs?: number };
      if (o.msg !== 'request' || !o.method || typeof o.durationMs !== 'number') continue;
      if (!by.has(o.method)) by.set(o.method, []);
      by.get(o.method)!.push(o.durationMs);
    } catch {
      /* not JSON */
    }
  }
  const out: Record<string, Summary & { totalMs: number }> = {};
  for (const [m, v] of [...by.entries()].sort()) out[m] = { ...summarize(v), totalMs: v.reduce((a, b) => a + b, 0) };
  return out;
}

export function formatProfile(p: Record<string, Summary & { totalMs: number }>): string {
  return Object.entries(p)
    .map(([m, s]) => `  ${m.padEnd(28)} n=${String(s.n).padStart(5)}  median ${s.median.toFixed(1).padStart(7)}  p90 ${s.pct90.toFixed(1).padStart(7)}  max ${s.max.toFixed(1).padStart(7)}  total ${s.totalMs.toFixed(0).padStart(7)}`)
    .join('\n');
}
