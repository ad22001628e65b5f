/**
 * `gear analyze IMAGE…`: measure how much of a set of images is redundant
 * (layers, files, optionally fixed-size chunks) and what a registry would
 * store as plain layers vs as Gear files (docs/analyze.md).
 *
 * IMAGE: registry reference | docker-archive:FILE | oci:DIR[:TAG] | docker-daemon:IMAGE
 *
 * Output: a table on stdout (or --json), --plot FILE.svg|FILE.png; progress
 * bars on a TTY (stderr), plain lines otherwise.
 */
import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { analyzeImages, type AnalyzeProgress } from '../analyze/analyze.js';
import { MAX_CHUNK_BYTES, MIN_CHUNK_BYTES } from '../analyze/chunk-table.js';
import { writePlot } from '../analyze/plot.js';
import { formatReport, type AnalyzeReport } from '../analyze/report.js';
import { newRegistryClient } from '../convert/registry-adapter.js';
import { invalidArgument } from '../core/errors.js';
import type { BlobLocation } from '../core/index/manifest.js';
import { parseSize, formatSize } from '../core/pool/size.js';
import { parseRepository } from '../core/registry/reference.js';
import { openSource } from './convert.js';

interface AnalyzeFlags {
  json?: boolean;
  plot?: string;
  chunks?: string;
  storage: string;
  rawAbove: string;
  formatVersion: string;
  location?: string;
  dockerHost?: string;
  tmpDir?: string;
  insecureRegistry: string[];
  progress?: boolean;
}

function progressReporter(tty: boolean, quiet: boolean): { on: (e: AnalyzeProgress) => void; stop: () => void } {
  if (quiet) return { on: () => undefined, stop: () => undefined };
  if (!tty) {
    return {
      on: (e) => {
        if (e.kind === 'image') process.stderr.write(`reading ${e.index + 1}/${e.count} ${e.name}\n`);
      },
      stop: () => undefined,
    };
  }
  const multi = new cliProgress.MultiBar(
    { clearOnComplete: false, hideCursor: true, format: '{label} |{bar}| {value}/{total} {unit}', stream: process.stderr },
    cliProgress.Presets.shades_classic,
  );
  const images = multi.create(1, 0, { label: 'images ', unit: '' });
  const layers = multi.create(1, 0, { label: 'layers ', unit: '' });
  const bytes = multi.create(0, 0, { label: 'read MB', unit: 'MB' });
  let read = 0;
  let shown = 0;
  let stopped = false;
  return {
    on: (e) => {
      if (e.kind === 'image') {
        images.setTotal(e.count);
        images.update(e.index, { unit: e.name });
      } else if (e.kind === 'layer') {
        layers.setTotal(e.count);
        layers.update(e.index);
      } else {
        read += e.bytes;
        const v = Math.round(read / 1e6);
        if (v !== shown) {
          shown = v;
          bytes.setTotal(Math.max(v, bytes.getTotal()));
          bytes.update(v);
        }
      }
    },
    stop: () => {
      if (stopped) return;
      stopped = true;
      images.update(images.getTotal(), { unit: '' });
      layers.update(layers.getTotal());
      multi.stop();
    },
  };
}

/** Runs an analysis the way the CLI does; exported for tests and the benchmark. */
export async function runAnalyze(images: string[], flags: AnalyzeFlags): Promise<AnalyzeReport> {
  if (images.length === 0) throw invalidArgument('name at least one image');
  if (flags.storage !== 'auto' && flags.storage !== 'raw') throw invalidArgument('--storage must be auto or raw');
  if (flags.formatVersion !== '1' && flags.formatVersion !== '2') throw invalidArgument(`--format-version must be 1 or 2 (gear analyze predicts one blob per file; the packs of version 3 are not modelled yet), not ${flags.formatVersion}`);
  const rawMinBytes = flags.rawAbove === 'off' ? Infinity : parseSize(flags.rawAbove);
  let chunkSize: number | undefined;
  if (flags.chunks !== undefined) {
    chunkSize = parseSize(flags.chunks);
    if (chunkSize < MIN_CHUNK_BYTES || chunkSize > MAX_CHUNK_BYTES) {
      throw invalidArgument(`--chunks ${flags.chunks}: want a chunk size from ${formatSize(MIN_CHUNK_BYTES)} to ${formatSize(MAX_CHUNK_BYTES)}, e.g. 1MiB`);
    }
  }
  let location: BlobLocation | undefined;
  if (flags.location) {
    const r = parseRepository(flags.location);
    location = { registry: r.registry, repository: r.repository };
  }
  if (flags.plot !== undefined && !/\.(svg|png)$/i.test(flags.plot)) throw invalidArgument(`--plot ${JSON.stringify(flags.plot)}: the file name must end in .svg or .png`);
  const client = newRegistryClient({ insecureRegistries: flags.insecureRegistry });
  const reporter = progressReporter(Boolean(process.stderr.isTTY) && flags.progress !== false, flags.progress === false || (Boolean(flags.json) && !process.stderr.isTTY));
  try {
    const report = await analyzeImages(
      images.map((name) => ({ name, open: () => openSource(name, flags, client) })),
      {
        storage: flags.storage,
        rawMinBytes,
        chunkSize,
        formatVersion: flags.formatVersion === '1' ? 1 : 2,
        location,
        progress: reporter.on,
      },
    );
    reporter.stop();
    if (flags.plot) await writePlot(report, flags.plot);
    return report;
  } finally {
    reporter.stop();
    await client.close();
  }
}

export function registerAnalyze(program: Command): void {
  program
    .command('analyze')
    .description('measure redundancy (layers, files, chunks) across images and what a registry stores as plain layers vs as Gear files')
    .argument('<image...>', 'registry reference, docker-archive:FILE, oci:DIR[:TAG] or docker-daemon:IMAGE')
    .option('--json', 'print the report as one JSON object on stdout')
    .option('--plot <file>', 'write a chart (stored bytes per scheme, pairwise sharing matrix) to FILE.svg or FILE.png')
    .option('--chunks <size>', 'also measure fixed-size chunk deduplication with this chunk size, e.g. 1MiB')
    .option('--storage <mode>', 'Gear file storage to predict, as gear convert --storage: auto (gzip when it saves ≥10%) or raw', 'auto')
    .option('--raw-above <size>', 'as gear convert --raw-above: files of at least this size are stored raw ("off": gzip them too)', '8MiB')
    .option('--format-version <n>', 'as gear convert --format-version: the index format to predict (2 or 1)', '2')
    .option('--location <registry/repository>', 'the repository the Gear files would go to (written in each index; makes the index sizes exact)')
    .option('--docker-host <url>', 'Docker Engine socket for docker-daemon: (default $DOCKER_HOST or unix:///var/run/docker.sock)')
    .option('--tmp-dir <dir>', 'where docker-daemon: images are saved while read')
    .option('--insecure-registry <host>', 'registry reachable over plain http (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--no-progress', 'no progress output')
    .action(async (images: string[], flags: AnalyzeFlags) => {
      const report = await runAnalyze(images, flags);
      if (flags.json) process.stdout.write(`${JSON.stringify(report)}\n`);
      else {
        process.stdout.write(formatReport(report));
        if (flags.plot) process.stdout.write(`\nplot written to ${flags.plot}\n`);
      }
    });
}
