/**
 * The picture of a run: median cold-deploy time (pull + run) per image and
 * system, one grouped bar chart per link, written as a PNG next to the
 * results JSON (<stem>-deploy.png). The SVG is drawn here and rendered by
 * src/analyze/plot.ts's renderPng (resvg, the project's existing dependency).
 */
import { renameSync, writeFileSync } from 'node:fs';
import { renderPng } from '../../src/analyze/plot.js';
import { median } from './stats.js';
import { SYSTEMS, type Samples, type System } from './systems.js';

const FONT = 'DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif';
const COLOURS: Record<System, string> = {
  overlay2: '#9e9e9e',
  gear: '#81c784',
  'gear-opt': '#2e7d32',
  'gear-ctr': '#90caf9',
  'gear-opt-ctr': '#1565c0',
  estargz: '#ffb74d',
  'estargz-opt': '#e65100',
};

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

function niceTop(v: number): number {
  const p = 10 ** Math.floor(Math.log10(Math.max(v, 1e-3)));
  return ([1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].find((k) => k * p >= v) ?? 10) * p;
}

/** The SVG of the deploy-time charts, or undefined when there is no sample. */
export function deploySvg(samples: Samples, title: string): string | undefined {
  const links = Object.keys(samples).filter((l) => Object.keys(samples[l]!).length);
  if (!links.length) return undefined;
  const chartH = 260;
  const top = 60;
  const blockH = chartH + 110;
  const charts: { link: string; images: string[]; systems: System[]; values: Record<string, Partial<Record<System, number>>> }[] = [];
  for (const link of links) {
    const images = Object.keys(samples[link]!);
    const values: Record<string, Partial<Record<System, number>>> = {};
    const used = new Set<System>();
    for (const image of images) {
      values[image] = {};
      for (const s of SYSTEMS) {
        const xs = samples[link]![image]!.deploy?.[s];
        if (xs?.length) {
          values[image]![s] = median(xs);
          used.add(s);
        }
      }
    }
    charts.push({ link, images, systems: SYSTEMS.filter((s) => used.has(s)), values });
  }
  const barW = 14;
  const groupW = (n: number) => n * barW + 18;
  const left = 70;
  const width = Math.max(left + 20 + SYSTEMS.length * 110, left + 40 + Math.max(...charts.map((c) => c.images.length * groupW(c.systems.length))));
  const height = top + charts.length * blockH + 40;
  const o: string[] = [];
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="${FONT}" font-size="12">`);
  o.push(`<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`);
  o.push(`<text x="20" y="30" font-size="18" font-weight="bold">${esc(title)}</text>`);
  charts.forEach((c, k) => {
    const y0 = top + k * blockH + 30;
    const max = niceTop(Math.max(...c.images.flatMap((i) => Object.values(c.values[i]!) as number[])));
    o.push(`<text x="${left}" y="${y0 - 12}" font-size="14" font-weight="bold">${esc(`${c.link}: median cold deploy (pull + run), seconds`)}</text>`);
    for (let t = 0; t <= 4; t++) {
      const y = y0 + chartH - (chartH * t) / 4;
      o.push(`<line x1="${left}" y1="${y}" x2="${width - 20}" y2="${y}" stroke="#e0e0e0"/>`);
      o.push(`<text x="${left - 6}" y="${y + 4}" text-anchor="end" font-size="11" fill="#555">${Number(((max * t) / 4).toFixed(2))} s</text>`);
    }
    c.images.forEach((image, gi) => {
      const gx = left + 10 + gi * groupW(c.systems.length);
      c.systems.forEach((s, si) => {
        const v = c.values[image]![s];
        if (v === undefined) return;
        const h = (chartH * v) / max;
        o.push(`<rect x="${gx + si * barW}" y="${(y0 + chartH - h).toFixed(1)}" width="${barW - 2}" height="${h.toFixed(1)}" fill="${COLOURS[s]}"><title>${esc(`${image} ${s}: ${v.toFixed(2)} s`)}</title></rect>`);
      });
      o.push(`<text x="${gx + (c.systems.length * barW) / 2}" y="${y0 + chartH + 16}" text-anchor="middle" font-size="11">${esc(image.length > 22 ? `${image.slice(0, 21)}…` : image)}</text>`);
    });
    const perRow = Math.max(1, Math.floor((width - left - 20) / 110));
    c.systems.forEach((s, i) => {
      const x = left + (i % perRow) * 110;
      const y = y0 + chartH + 40 + Math.floor(i / perRow) * 18;
      o.push(`<rect x="${x}" y="${y - 10}" width="12" height="12" fill="${COLOURS[s]}"/><text x="${x + 16}" y="${y}" font-size="12">${esc(s)}</text>`);
    });
  });
  o.push('</svg>');
  return `${o.join('\n')}\n`;
}

/** Writes <jsonFile without .json>-deploy.png (temp name + rename); returns its path, or undefined without samples. */
export async function writeDeployPlot(jsonFile: string, samples: Samples | undefined, title: string): Promise<string | undefined> {
  if (!samples) return undefined;
  const svg = deploySvg(samples, title);
  if (!svg) return undefined;
  const file = jsonFile.replace(/\.json$/, '') + '-deploy.png';
  const tmp = `${file}.tmp-${process.pid}`;
  writeFileSync(tmp, await renderPng(svg));
  renameSync(tmp, file);
  return file;
}
