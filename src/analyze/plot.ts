/**
 * `gear analyze --plot FILE.svg|FILE.png`: one picture with two charts.
 *
 *  left:  stored bytes per scheme (plain layers, Gear, chunks), each bar split
 *         into what it is made of, the total above it;
 *  right: the pairwise sharing matrix: cell (row a, column b) is the share of
 *         a's distinct file content that b holds too (colour), with the bytes
 *         written in the cell while the matrix is small enough to read.
 *
 * The SVG is written here (text); a PNG is that SVG rendered by resvg
 * (@resvg/resvg-js, prebuilt binary in its npm package), with the system's
 * fonts (DejaVu Sans on Debian).
 */
import { rename, writeFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { invalidArgument } from '../core/errors.js';
import { formatSize } from '../core/pool/size.js';
import type { AnalyzeReport } from './report.js';

const FONT = "DejaVu Sans, Liberation Sans, Arial, Helvetica, sans-serif";

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function shorten(s: string, max: number): string {
  return s.length <= max ? s : `…${s.slice(s.length - max + 1)}`;
}

/** White → dark blue as t goes 0 → 1. */
function heat(t: number): string {
  const c = Math.max(0, Math.min(1, t));
  const from = [247, 251, 255];
  const to = [8, 48, 107];
  const mix = from.map((f, i) => Math.round(f + (to[i]! - f) * c));
  return `rgb(${mix.join(',')})`;
}

/** The smallest round number (1, 1.2, 1.5, 2 … 8 × 10^j × 1024^k) at or above `v`: the axis top, in IEC units. */
function niceCeiling(v: number): number {
  let unit = 1;
  while (v / unit >= 1024) unit *= 1024;
  const x = v / unit;
  const p = 10 ** Math.floor(Math.log10(x));
  const m = [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].find((k) => k * p >= x) ?? 10;
  return m * p * unit;
}

interface Segment {
  label: string;
  bytes: number;
  colour: string;
}

/** The two charts as one SVG document. */
export function renderSvg(r: AnalyzeReport): string {
  const s = r.storage;
  const bars: { name: string; segments: Segment[] }[] = [
    {
      name: 'plain layers',
      segments: [
        { label: 'layer blobs', bytes: s.layers.layerBytes, colour: '#9e9e9e' },
        { label: 'configs', bytes: s.layers.configBytes, colour: '#616161' },
      ],
    },
    {
      name: 'Gear',
      segments: [
        { label: 'Gear files', bytes: s.gear.fileBytes, colour: '#2e7d32' },
        { label: 'index layers', bytes: s.gear.indexBytes, colour: '#81c784' },
        { label: 'configs', bytes: s.gear.configBytes + s.gear.keepAliveConfigBytes, colour: '#616161' },
      ],
    },
  ];
  if (s.chunks && r.chunks) {
    bars.push({
      name: `${formatSize(r.chunks.size)} chunks`,
      segments: [
        { label: 'chunks', bytes: s.chunks.chunkBytes, colour: '#ef6c00' },
        { label: 'index layers', bytes: s.chunks.indexBytes, colour: '#81c784' },
        { label: 'configs', bytes: s.chunks.configBytes, colour: '#616161' },
      ],
    });
  }
  const n = r.images.length;
  const showNames = n <= 16;
  const showValues = n <= 10;
  const labelW = showNames ? Math.min(240, 14 + 7 * r.images.reduce((m, im) => Math.max(m, shorten(im.name, 32).length), 4)) : 40;
  const cell = n <= 10 ? 64 : Math.max(4, Math.floor(560 / n));
  const matrixW = labelW + n * cell;

  const chartX = 70;
  const chartTop = 90;
  const chartH = 360;
  const barW = 90;
  const barGap = 50;
  const chartW = bars.length * (barW + barGap) + barGap;
  const matrixX = chartX + chartW + 90;
  const matrixTop = chartTop + (showNames ? 10 : 0);
  const width = Math.max(matrixX + Math.max(matrixW, labelW + 300) + 40, 900);
  const legendTop = chartTop + chartH + 60;
  const height = Math.max(legendTop + 110, matrixTop + n * cell + (showNames ? 160 : 90));

  const o: string[] = [];
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="${FONT}" font-size="13">`);
  o.push(`<rect x="0" y="0" width="${width}" height="${height}" fill="#ffffff"/>`);
  o.push(
    `<text x="20" y="32" font-size="20" font-weight="bold">gear analyze: ${n} image${n === 1 ? '' : 's'}, ${r.files.files} files, ${r.files.distinct} distinct contents</text>`,
  );

  // Bar chart.
  const max = niceCeiling(bars.reduce((m, b) => Math.max(m, b.segments.reduce((a, g) => a + g.bytes, 0)), 1));
  o.push(`<text x="${chartX}" y="${chartTop - 30}" font-size="15" font-weight="bold">Registry storage per scheme</text>`);
  for (let t = 0; t <= 4; t++) {
    const y = chartTop + chartH - (chartH * t) / 4;
    o.push(`<line x1="${chartX}" y1="${y}" x2="${chartX + chartW}" y2="${y}" stroke="#e0e0e0"/>`);
    o.push(`<text x="${chartX - 6}" y="${y + 4}" text-anchor="end" font-size="11" fill="#555">${esc(formatSize((max * t) / 4))}</text>`);
  }
  o.push(`<line x1="${chartX}" y1="${chartTop + chartH}" x2="${chartX + chartW}" y2="${chartTop + chartH}" stroke="#333"/>`);
  const layersTotal = s.layers.totalBytes;
  const legend = new Map<string, string>();
  bars.forEach((b, i) => {
    const x = chartX + barGap + i * (barW + barGap);
    let y = chartTop + chartH;
    for (const g of b.segments) {
      const h = (chartH * g.bytes) / max;
      y -= h;
      if (h > 0) o.push(`<rect x="${x}" y="${y.toFixed(2)}" width="${barW}" height="${h.toFixed(2)}" fill="${g.colour}"><title>${esc(`${g.label}: ${formatSize(g.bytes)}`)}</title></rect>`);
      legend.set(g.label, g.colour);
    }
    const total = b.segments.reduce((a, g) => a + g.bytes, 0);
    const share = layersTotal > 0 ? ` (${((100 * total) / layersTotal).toFixed(0)}%)` : '';
    o.push(`<text x="${x + barW / 2}" y="${y - 8}" text-anchor="middle" font-weight="bold">${esc(formatSize(total))}</text>`);
    o.push(`<text x="${x + barW / 2}" y="${chartTop + chartH + 18}" text-anchor="middle">${esc(b.name)}</text>`);
    o.push(`<text x="${x + barW / 2}" y="${chartTop + chartH + 34}" text-anchor="middle" font-size="11" fill="#555">${esc(share.trim())}</text>`);
  });
  [...legend].forEach(([label, colour], i) => {
    const x = chartX + (i % 3) * 130;
    const y = legendTop + Math.floor(i / 3) * 20;
    o.push(`<rect x="${x}" y="${y - 10}" width="12" height="12" fill="${colour}"/>`);
    o.push(`<text x="${x + 18}" y="${y}" font-size="12">${esc(label)}</text>`);
  });
  const f = r.files;
  const notes = [
    `file content: ${formatSize(f.bytes)} in all images, ${formatSize(f.distinctBytes)} distinct`,
    `duplicate within images ${formatSize(f.withinImages.bytes)}, across images ${formatSize(f.acrossImages.bytes)}`,
  ];
  notes.forEach((t, i) => o.push(`<text x="${chartX}" y="${legendTop + 54 + i * 18}" font-size="12" fill="#333">${esc(t)}</text>`));

  // Sharing matrix.
  o.push(`<text x="${matrixX}" y="${chartTop - 30}" font-size="15" font-weight="bold">File content shared between images</text>`);
  o.push(`<text x="${matrixX}" y="${chartTop - 12}" font-size="12" fill="#555">cell: bytes both hold, and the share of the row image's distinct content</text>`);
  const gx = matrixX + labelW;
  // Label every row and column while they fit, else every k-th.
  const rowStep = Math.max(1, Math.ceil(13 / cell));
  const colStep = Math.max(1, Math.ceil((n >= 100 ? 30 : 22) / cell));
  const bytes = r.sharing.bytes;
  for (let a = 0; a < n; a++) {
    const y = matrixTop + a * cell;
    const rowLabel = showNames ? `${a + 1} ${shorten(r.images[a]!.name, 32)}` : `${a + 1}`;
    if (a % rowStep === 0) {
      o.push(`<text x="${gx - 6}" y="${y + cell / 2 + 4}" text-anchor="end" font-size="${Math.min(12, Math.max(8, cell * rowStep - 3))}">${esc(rowLabel)}</text>`);
    }
    for (let b = 0; b < n; b++) {
      const own = bytes[a]![a]!;
      const t = own > 0 ? bytes[a]![b]! / own : 0;
      const x = gx + b * cell;
      o.push(`<rect x="${x}" y="${y}" width="${cell}" height="${cell}" fill="${heat(t)}" stroke="#ffffff" stroke-width="${cell > 8 ? 1 : 0}"><title>${esc(`${r.images[a]!.name} ∩ ${r.images[b]!.name}: ${formatSize(bytes[a]![b]!)} (${(100 * t).toFixed(1)}% of ${formatSize(own)})`)}</title></rect>`);
      if (showValues) {
        const fill = t > 0.55 ? '#ffffff' : '#111111';
        o.push(`<text x="${x + cell / 2}" y="${y + cell / 2 - 2}" text-anchor="middle" font-size="11" fill="${fill}">${esc(formatSize(bytes[a]![b]!))}</text>`);
        o.push(`<text x="${x + cell / 2}" y="${y + cell / 2 + 12}" text-anchor="middle" font-size="10" fill="${fill}">${(100 * t).toFixed(0)}%</text>`);
      }
    }
  }
  for (let b = 0; b < n; b++) {
    if (b % colStep === 0) {
      o.push(`<text x="${gx + b * cell + cell / 2}" y="${matrixTop + n * cell + 16}" text-anchor="middle" font-size="${Math.min(12, Math.max(8, cell))}">${b + 1}</text>`);
    }
  }
  // Colour scale.
  const scaleY = matrixTop + n * cell + 36;
  const scaleW = Math.min(240, Math.max(160, n * cell));
  for (let i = 0; i < 20; i++) o.push(`<rect x="${gx + (scaleW * i) / 20}" y="${scaleY}" width="${scaleW / 20 + 0.5}" height="12" fill="${heat(i / 19)}"/>`);
  o.push(`<text x="${gx}" y="${scaleY + 28}" font-size="11">0%</text>`);
  o.push(`<text x="${gx + scaleW}" y="${scaleY + 28}" font-size="11" text-anchor="end">100%</text>`);
  o.push(`<text x="${gx}" y="${scaleY + 46}" font-size="11" fill="#555">share of the row image's distinct file content</text>`);
  o.push('</svg>');
  return `${o.join('\n')}\n`;
}

/** The SVG rendered to PNG by resvg (white background). */
export async function renderPng(svg: string): Promise<Buffer> {
  let mod: typeof import('@resvg/resvg-js');
  try {
    mod = await import('@resvg/resvg-js');
  } catch (err) {
    throw new Error(`PNG output needs @resvg/resvg-js (npm ci installs it), or write an .svg instead: ${(err as Error).message}`, { cause: err });
  }
  const r = new mod.Resvg(svg, { background: '#ffffff', fitTo: { mode: 'zoom', value: 1.5 }, font: { loadSystemFonts: true, defaultFontFamily: 'DejaVu Sans' } });
  return r.render().asPng();
}

/** Writes the plot to `file`: SVG or PNG by its extension (temp name + rename). */
export async function writePlot(r: AnalyzeReport, file: string): Promise<void> {
  const ext = extname(file).toLowerCase();
  if (ext !== '.svg' && ext !== '.png') throw invalidArgument(`--plot ${JSON.stringify(file)}: the file name must end in .svg or .png`);
  const svg = renderSvg(r);
  const data = ext === '.svg' ? Buffer.from(svg) : await renderPng(svg);
  const tmp = `${file}.tmp-${process.pid}`;
  await writeFile(tmp, data);
  await rename(tmp, file);
}
