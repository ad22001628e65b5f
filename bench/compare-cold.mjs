// Medians and geomeans of cold deploys from bench logs, by label: the figures of A/B runs
// (bench/README.md, session 14), from the "cold-deploy <link> rep i/n <image>: <system> <s> s <MB> MB <n> req" lines.
// Usage: node bench/compare-cold.mjs LABEL=LOG[,LOG...] LABEL=LOG[,LOG...] ...
//   e.g. node bench/compare-cold.mjs off=bench/results/*-bgfetch-off-r1.log,... on=...
import { readFileSync } from 'node:fs';

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const runs = process.argv.slice(2).map((arg) => {
  const eq = arg.indexOf('=');
  if (eq <= 0) throw new Error(`want LABEL=LOG[,LOG...], got ${arg}`);
  return { label: arg.slice(0, eq), logs: arg.slice(eq + 1).split(',') };
});
/** label → "image system" → { s: [], mb: [] } */
const data = new Map();
for (const { label, logs } of runs) {
  const by = new Map();
  data.set(label, by);
  for (const log of logs) {
    for (const line of readFileSync(log, 'utf8').split('\n')) {
      const m = /cold-deploy \S+ rep \d+\/\d+ ([\w-]+): (.*)$/.exec(line);
      if (!m) continue;
      for (const part of m[2].split(';')) {
        const p = /^\s*([\w-]+) ([\d.]+) s ([\d.]+) MB/.exec(part);
        if (!p) continue;
        const key = `${m[1]} ${p[1]}`;
        if (!by.has(key)) by.set(key, { s: [], mb: [] });
        by.get(key).s.push(Number(p[2]));
        by.get(key).mb.push(Number(p[3]));
      }
    }
  }
}
const labels = [...data.keys()];
const keys = [...new Set(labels.flatMap((l) => [...data.get(l).keys()]))];
for (const k of keys) {
  const cells = labels.map((l) => {
    const d = data.get(l).get(k);
    return d ? `${l} ${median(d.s).toFixed(2)} s [${[...d.s].sort((a, b) => a - b).join(' ')}] ${median(d.mb).toFixed(1)} MB` : `${l} -`;
  });
  console.log(`${k.padEnd(22)} ${cells.join(' | ')}`);
}
const systems = [...new Set(keys.map((k) => k.split(' ')[1]))];
for (const sys of systems) {
  const images = keys.filter((k) => k.endsWith(` ${sys}`) && labels.every((l) => data.get(l).has(k)));
  const geo = (l) => Math.exp(images.reduce((t, k) => t + Math.log(median(data.get(l).get(k).s)), 0) / images.length);
  const base = geo(labels[0]);
  console.log(`geomean ${sys} over ${images.length} images: ${labels.map((l) => `${l} ${geo(l).toFixed(2)} s (${(geo(l) / base).toFixed(2)}x)`).join(', ')}`);
}
