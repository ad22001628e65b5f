/**
 * `gear copy SRC DST`: move a Gear image with its Gear files between
 * registries and OCI layouts (src/convert/copy.ts).
 *
 * SRC, DST: registry reference | oci:DIR[:TAG]
 *
 * Output: a progress bar on a TTY (stderr), plain lines otherwise; then a
 * summary (`--json`: one JSON object on stdout).
 */
import { addMirrorOptions, mirrorOptionsFrom, type MirrorFlags } from './registry-options.js';
import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { describeError, invalidArgument } from '../core/errors.js';
import { copyGearImage, type CopyProgress, type CopySummary } from '../convert/copy.js';
import { removeScratchOnSignals } from '../convert/scratch.js';
import { newRegistryClient } from '../convert/registry-adapter.js';
import { parseSourceSpec } from '../convert/source.js';
import { openDestination, openSource } from './convert.js';

interface CopyFlags extends MirrorFlags {
  json?: boolean;
  concurrency: string;
  filesPerManifest: string;
  tmpDir?: string;
  location?: string;
  insecureRegistry: string[];
  progress?: boolean;
}

const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;

function reporter(tty: boolean, quiet: boolean): { on: (e: CopyProgress) => void; stop: () => void } {
  if (quiet) return { on: () => undefined, stop: () => undefined };
  let total = 0;
  let done = 0;
  if (!tty) {
    let last = 0;
    return {
      on: (e) => {
        if (e.kind === 'copy-plan') {
          total = e.blobs;
          process.stderr.write(`checking/copying ${e.blobs} Gear files (${mb(e.bytes)})\n`);
        } else if (e.kind === 'copy-blob') {
          done++;
          const now = Date.now();
          if (done === total || now - last > 2000) {
            last = now;
            process.stderr.write(`gear files: ${done}/${total}\n`);
          }
        } else if (e.kind === 'phase') process.stderr.write(`writing ${e.phase}\n`);
      },
      stop: () => undefined,
    };
  }
  const bar = new cliProgress.SingleBar(
    { clearOnComplete: false, hideCursor: true, format: 'gear files |{bar}| {value}/{total} ({mb} MB sent, {skipped} present, {mounted} mounted)', stream: process.stderr },
    cliProgress.Presets.shades_classic,
  );
  let sent = 0;
  let skipped = 0;
  let mounted = 0;
  let started = false;
  return {
    on: (e) => {
      if (e.kind === 'copy-plan') {
        bar.start(e.blobs, 0, { mb: '0.0', skipped: 0, mounted: 0 });
        started = true;
      } else if (e.kind === 'copy-blob') {
        if (e.status === 'copied') sent += e.size;
        else if (e.status === 'present') skipped++;
        else mounted++;
        bar.increment(1, { mb: (sent / 1e6).toFixed(1), skipped, mounted });
      }
    },
    stop: () => {
      if (started) bar.stop();
    },
  };
}

function checkEnd(arg: string, what: string): void {
  if (/^(docker-archive|docker-daemon):/.test(arg)) {
    throw invalidArgument(
      `${what} ${JSON.stringify(arg)}: gear copy reads and writes registries and oci:DIR[:TAG] layouts. ` +
        'A pulled Gear image holds only its index, so copy it from the registry it was pulled from; convert other images with gear convert',
    );
  }
  if (what === 'source') parseSourceSpec(arg);
}

/** Runs a copy the way the CLI does; exported for tests. */
export async function runCopy(src: string, dst: string, flags: CopyFlags): Promise<CopySummary> {
  checkEnd(src, 'source');
  checkEnd(dst, 'destination');
  if (flags.location && !dst.startsWith('oci:')) throw invalidArgument('--location is for oci: destinations (a registry destination is the location)');
  const client = newRegistryClient({ insecureRegistries: flags.insecureRegistry, mirrors: mirrorOptionsFrom(flags) });
  const rep = reporter(Boolean(process.stderr.isTTY) && flags.progress !== false, Boolean(flags.json) && !process.stderr.isTTY);
  try {
    const source = await openSource(src, { tmpDir: flags.tmpDir }, client);
    try {
      const dest = await openDestination(dst, flags, client);
      return await copyGearImage(source, dest, {
        concurrency: Number(flags.concurrency),
        filesPerManifest: Number(flags.filesPerManifest),
        ...(flags.tmpDir ? { tmpDir: flags.tmpDir } : {}),
        progress: rep.on,
      });
    } finally {
      await source.close();
    }
  } finally {
    rep.stop();
    await client.close();
  }
}

export function registerCopy(program: Command): void {
  addMirrorOptions(program.command('copy'))
    .description('copy a Gear image with its Gear files between registries and oci: layouts (docker push / skopeo copy leave the files behind)')
    .argument('<src>', 'registry reference or oci:DIR[:TAG]')
    .argument('<dst>', 'registry reference or oci:DIR[:TAG]')
    .option('--json', 'print a JSON summary on stdout')
    .option('--concurrency <n>', 'blob transfers in flight', '4')
    .option('--files-per-manifest <n>', 'Gear files per keep-alive manifest', '10000')
    .option('--tmp-dir <dir>', 'where downloaded blobs wait for their upload')
    .option('--location <registry/repository>', 'for oci: destinations: where the Gear files will be pushed (recorded in the index)')
    .option('--insecure-registry <host>', 'registry reachable over plain http (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--no-progress', 'no progress bar')
    .action(async (src: string, dst: string, flags: CopyFlags) => {
      for (const [name, v] of [['--concurrency', flags.concurrency], ['--files-per-manifest', flags.filesPerManifest]] as const) {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1) throw invalidArgument(`${name} must be a positive integer`);
      }
      removeScratchOnSignals();
      try {
        const s = await runCopy(src, dst, flags);
        if (flags.json) process.stdout.write(`${JSON.stringify(s)}\n`);
        else {
          const loc = s.location ? `${s.location.registry}/${s.location.repository}` : 'none (set one with --location)';
          process.stdout.write(
            `${s.destination}@${s.manifestDigest}\n` +
              `  ${s.blobs} Gear files: copied ${s.blobsCopied} (${mb(s.bytesCopied)}), mounted ${s.blobsMounted} (${mb(s.bytesMounted)}), already there ${s.blobsPresent} (${mb(s.bytesPresent)})\n` +
              `  files location: ${loc}${s.indexRewritten ? ` (new index; the source was ${s.sourceManifestDigest})` : ' (index unchanged)'}\n` +
              `  ${s.keepAliveManifests} keep-alive manifest(s), ${s.seconds.toFixed(1)} s\n`,
          );
        }
      } catch (err) {
        throw new Error(`copy ${src} → ${dst}: ${describeError(err)}`, { cause: err });
      }
    });
}
