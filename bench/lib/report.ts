/**
 * Benchmark results: metrics with raw samples per driver, a table printer and
 * the results JSON writer (bench/results/<date>-<shortsha>.json).
 *
 * Extension point: a benchmark section calls report.add({...}) once per metric
 * with the raw samples of both drivers (same repetition order, so samples[i]
 * of overlay2 and gear are a pair) and, when the metric has a target, the
 * minimum gear/overlay2 ratio. Informational figures (bytes received, phase
 * breakdowns, status lines) go to report.extra[section].
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { join } from 'node:path';
import { median, summarize, type Summary } from './stats.js';

export type Driver = 'overlay2' | 'gear';

export interface MetricInput {
  /** Section, e.g. 'lifecycle', 'read', 'cold-deploy'. */
  section: string;
  /** Short human name for the table. */
  name: string;
  unit: string;
  /** true for rates/throughput, false for durations and bytes. */
  higherIsBetter: boolean;
  samples: Record<Driver, number[]>;
  /**
   * Minimum "gear relative to overlay2" figure: gear/overlay2 when higher is
   * better, overlay2/gear (ratio of throughputs) when lower is better.
   * Omitted: informational only.
   */
  target?: number;
  /** What one sample is, how it was taken. */
  description?: string;
}

export interface Metric extends MetricInput {
  summary: Record<Driver, Summary>;
  /** Ratio of the medians, oriented so that > 1 means gear is better. */
  ratio: number;
  /** Median of the per-repetition ratios (pairs taken next to each other in time). */
  pairedRatio: number;
  pass?: boolean;
}

const orient = (m: MetricInput, o2: number, g: number): number => (m.higherIsBetter ? g / o2 : o2 / g);

export class Report {
  readonly metrics: Metric[] = [];
  readonly extra: Record<string, unknown> = {};
  readonly notes: string[] = [];
  /** Tables a section prints beside the main one (e.g. cold-deploy's side-by-side systems), also kept in the JSON. */
  readonly tables: { title: string; text: string }[] = [];
  readonly started = new Date();

  /** The commit the run measures: HEAD when the run started (a commit made during a long run must not relabel it). */
  private readonly commitAtStart: string;

  constructor(readonly config: Record<string, unknown>) {
    try {
      this.commitAtStart = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: new URL('../..', import.meta.url).pathname, encoding: 'utf8' }).trim();
    } catch {
      this.commitAtStart = 'unknown';
    }
  }

  add(m: MetricInput): Metric {
    const summary = { overlay2: summarize(m.samples.overlay2), gear: summarize(m.samples.gear) };
    const ratio = orient(m, summary.overlay2.median, summary.gear.median);
    const pairs: number[] = [];
    for (let i = 0; i < Math.min(m.samples.overlay2.length, m.samples.gear.length); i++) {
      pairs.push(orient(m, m.samples.overlay2[i]!, m.samples.gear[i]!));
    }
    const metric: Metric = { ...m, summary, ratio, pairedRatio: median(pairs) };
    if (m.target !== undefined) metric.pass = ratio >= m.target;
    this.metrics.push(metric);
    return metric;
  }

  note(s: string): void {
    this.notes.push(s);
    process.stdout.write(`[bench] note: ${s}\n`);
  }

  /** The summary table (metric, overlay2 median, gear median, ratio, target, pass/fail). */
  table(): string {
    const fmt = (v: number, unit: string): string => {
      if (!Number.isFinite(v)) return '-';
      if (unit === 'bytes') return v >= 1e6 ? `${(v / 1e6).toFixed(2)} MB` : v >= 1e3 ? `${(v / 1e3).toFixed(1)} kB` : `${v.toFixed(0)} B`;
      const digits = Math.abs(v) >= 100 ? 1 : Math.abs(v) >= 10 ? 2 : 3;
      return `${v.toFixed(digits)} ${unit}`;
    };
    const rows: string[][] = [['metric', 'n', 'overlay2 median', 'gear median', 'ratio', 'paired', 'target', 'result']];
    for (const m of this.metrics) {
      rows.push([
        m.name,
        `${m.summary.overlay2.n}/${m.summary.gear.n}`,
        fmt(m.summary.overlay2.median, m.unit),
        fmt(m.summary.gear.median, m.unit),
        Number.isFinite(m.ratio) ? `${m.ratio.toFixed(3)}x` : '-',
        Number.isFinite(m.pairedRatio) ? `${m.pairedRatio.toFixed(3)}x` : '-',
        m.target !== undefined ? `>= ${m.target}x` : 'info',
        m.pass === undefined ? '' : m.pass ? 'PASS' : 'FAIL',
      ]);
    }
    const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
    const line = (r: string[]) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ');
    const out = [line(rows[0]!), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.slice(1).map(line)];
    out.push('ratio: gear relative to overlay2 from the medians, > 1 = gear better (rates: gear/overlay2; times and bytes: overlay2/gear).');
    out.push('paired: median of the per-repetition ratios (each pair measured back to back).');
    return out.join('\n');
  }

  /** Writes bench/results/<date>-<shortsha>.json (atomically) and returns its path. */
  write(repoRoot: string): string {
    const git = (args: string[]): string => {
      try {
        return execFileSync('git', args, { cwd: repoRoot, encoding: 'utf8' }).trim();
      } catch {
        return 'unknown';
      }
    };
    const commit = this.commitAtStart !== 'unknown' ? this.commitAtStart : git(['rev-parse', 'HEAD']);
    const shortSha = commit.slice(0, 7);
    const dirty = git(['status', '--porcelain', '--untracked-files=no', '--', 'src']) !== '';
    const date = this.started.toISOString();
    const stamp = date.replace(/[-:]/g, '').replace(/\..*$/, '').replace('T', '-');
    const dir = join(repoRoot, 'bench/results');
    mkdirSync(dir, { recursive: true });
    const file = join(dir, `${stamp}-${shortSha}.json`);
    const version = (cmd: string, args: string[]): string => {
      try {
        return execFileSync(cmd, args, { encoding: 'utf8', timeout: 10_000 }).trim().split('\n')[0]!;
      } catch {
        return 'unknown';
      }
    };
    let loadavg = 'unknown';
    try {
      loadavg = readFileSync('/proc/loadavg', 'utf8').trim();
    } catch {
      /* not linux */
    }
    const doc = {
      schema: 'gear-bench/1',
      commit,
      srcDirty: dirty,
      date,
      finished: new Date().toISOString(),
      host: {
        kernel: release(),
        cpus: cpus().length,
        cpuModel: cpus()[0]?.model,
        memBytes: totalmem(),
        node: process.version,
        dockerd: version('/usr/sbin/dockerd', ['--version']),
        loadavgAtEnd: loadavg,
      },
      config: this.config,
      metrics: this.metrics,
      extra: this.extra,
      tables: this.tables,
      notes: this.notes,
    };
    writeFileSync(`${file}.tmp`, JSON.stringify(doc, null, 2) + '\n');
    renameSync(`${file}.tmp`, file);
    return file;
  }
}
