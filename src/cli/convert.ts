/**
 * `gear convert SRC DST`: turn an image into a Gear image (docs/format.md).
 *
 * SRC: registry reference | docker-archive:FILE | oci:DIR[:TAG] | docker-daemon:IMAGE
 * DST: registry reference | oci:DIR[:TAG]
 *
 * Output: progress bars on a TTY (stderr), plain lines otherwise; `--json`
 * prints the summary as one JSON object on stdout.
 */
import { addMirrorOptions, mirrorOptionsFrom, type MirrorFlags } from './registry-options.js';
import type { Command } from 'commander';
import cliProgress from 'cli-progress';
import { describeError, invalidArgument, isClass } from '../core/errors.js';
import { GEAR_FORMAT_VERSION, type BlobLocation } from '../core/index/manifest.js';
import { convertImage, type ConvertSummary, type ProgressEvent } from '../convert/convert.js';
import { ociLayoutDestination, registryDestination, type Destination } from '../convert/destination.js';
import { removeScratchOnSignals } from '../convert/scratch.js';
import { readReusable, type ReusableImage } from '../convert/reuse.js';
import { newRegistryClient, openRegistry } from '../convert/registry-adapter.js';
import { openDockerArchive, openDockerDaemon, openOciLayout, openRegistryImage, parseSourceSpec, type SourceImage } from '../convert/source.js';
import { parseReference, parseRepository } from '../core/registry/reference.js';
import { parseSize } from '../core/pool/size.js';

interface ConvertFlags extends MirrorFlags {
  json?: boolean;
  dockerHost?: string;
  concurrency: string;
  filesPerManifest: string;
  tmpDir?: string;
  location?: string;
  insecureRegistry: string[];
  progress?: boolean;
  storage?: string;
  /** Size from which Gear files are stored raw (range-readable), e.g. "8MiB"; "off" gzips them too. */
  rawAbove?: string;
  /** Gear format version of the index: "3" (default), "2" or "1" for nodes with an older gear. */
  formatVersion?: string;
  /** Format version 3: Gear v3 images whose packs may be reused (repeatable). */
  dedupWith?: string[];
  /** Publish the Gear image as an OCI referrer of the (registry) source, in its repository, instead of under a tag. */
  attach?: boolean;
}

/** What `gear convert` writes unless told (--format-version). */
export const DEFAULT_FORMAT_VERSION = String(GEAR_FORMAT_VERSION);

const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;

function progressReporter(tty: boolean, quiet: boolean): { on: (e: ProgressEvent) => void; stop: () => void } {
  if (quiet) return { on: () => undefined, stop: () => undefined };
  if (!tty) {
    let lastUploadLine = 0;
    let uploaded = 0;
    let total = 0;
    return {
      on: (e) => {
        if (e.kind === 'layer') process.stderr.write(`reading ${e.name}\n`);
        else if (e.kind === 'upload-plan') {
          total = e.blobs;
          process.stderr.write(`checking/uploading ${e.blobs} Gear files (${mb(e.bytes)})\n`);
        } else if (e.kind === 'blob' && ++uploaded <= total) {
          const now = Date.now();
          if (uploaded === total || now - lastUploadLine > 2000) {
            lastUploadLine = now;
            process.stderr.write(`gear files: ${uploaded}/${total}\n`);
          }
        } else if (e.kind === 'pack') {
          process.stderr.write(`pack ${e.digest.slice(7, 19)} ${mb(e.size)} ${e.status}\n`);
        } else if (e.kind === 'phase') process.stderr.write(`writing ${e.phase}\n`);
      },
      stop: () => undefined,
    };
  }
  const multi = new cliProgress.MultiBar(
    { clearOnComplete: false, hideCursor: true, format: '{label} |{bar}| {value}/{total} {unit}', stream: process.stderr },
    cliProgress.Presets.shades_classic,
  );
  const layers = multi.create(1, 0, { label: 'layers ', unit: '' });
  const bytes = multi.create(0, 0, { label: 'read MB', unit: 'MB' });
  let upload: cliProgress.SingleBar | undefined;
  let uploadUnit: 'blobs' | 'packs' | undefined;
  let readBytes = 0;
  return {
    on: (e) => {
      if (e.kind === 'layer') {
        layers.setTotal(e.count);
        layers.update(e.index);
      } else if (e.kind === 'layer-bytes') {
        readBytes += e.bytes;
        const v = Math.round(readBytes / 1e6);
        bytes.setTotal(Math.max(v, bytes.getTotal()));
        bytes.update(v);
      } else if (e.kind === 'upload-plan') {
        layers.update(layers.getTotal());
        upload = multi.create(e.blobs, 0, { label: 'files  ', unit: 'blobs' });
        uploadUnit = 'blobs';
      } else if (e.kind === 'pack') {
        // Packs are uploaded while the layers are read, as each fills: the count grows with them.
        if (!upload) {
          upload = multi.create(1, 0, { label: 'packs  ', unit: 'packs' });
          uploadUnit = 'packs';
        } else if (upload.getProgress() >= 1) upload.setTotal(upload.getTotal() + 1);
        upload?.increment();
      } else if (e.kind === 'blob' && uploadUnit === 'blobs') upload?.increment();
      else if (e.kind === 'phase') layers.update(layers.getTotal()); // the layers are read: the index is next
    },
    stop: () => multi.stop(),
  };
}

export async function openSource(src: string, flags: Pick<ConvertFlags, 'dockerHost' | 'tmpDir'>, client: ReturnType<typeof newRegistryClient>): Promise<SourceImage> {
  const spec = parseSourceSpec(src);
  switch (spec.kind) {
    case 'docker-archive':
      return openDockerArchive(spec.file);
    case 'docker-daemon':
      return openDockerDaemon(spec.image, flags.dockerHost, flags.tmpDir);
    case 'oci':
      return openOciLayout(spec.arg);
    case 'registry':
      return openRegistryImage(openRegistry(spec.ref, client), spec.ref);
  }
}

export async function openDestination(dst: string, flags: Pick<ConvertFlags, 'location'>, client: ReturnType<typeof newRegistryClient>): Promise<Destination> {
  if (dst.startsWith('oci:')) {
    let location: BlobLocation | undefined;
    if (flags.location) {
      const r = parseRepository(flags.location);
      location = { registry: r.registry, repository: r.repository };
    }
    return ociLayoutDestination(dst.slice('oci:'.length), location);
  }
  if (/^[a-z-]+:/.test(dst) && !dst.startsWith('docker://') && !/^[^/]+:[0-9]+\//.test(dst)) {
    throw invalidArgument(`destination ${JSON.stringify(dst)}: use a registry reference or oci:DIR[:TAG]`);
  }
  return registryDestination(openRegistry(dst.replace(/^docker:\/\//, ''), client));
}

/**
 * Where `--attach` publishes: the source's own repository (registry sources
 * only: the referrer must sit beside the manifest it names).
 */
export function attachDestination(src: string): string {
  const spec = parseSourceSpec(src);
  if (spec.kind !== 'registry') {
    throw invalidArgument(`--attach needs a registry source (the Gear index is published beside the original image), not ${JSON.stringify(src)}`);
  }
  const r = parseReference(spec.ref);
  return `${r.registry}/${r.repository}:${r.tag ?? 'latest'}`;
}

/** Runs a conversion the way the CLI does; exported for tests and the benchmark. With `flags.attach`, `dst` is ignored (pass ''). */
export async function runConvert(src: string, dst: string, flags: ConvertFlags): Promise<ConvertSummary> {
  const client = newRegistryClient({ insecureRegistries: flags.insecureRegistry, mirrors: mirrorOptionsFrom(flags) });
  const reporter = progressReporter(Boolean(process.stderr.isTTY) && flags.progress !== false, Boolean(flags.json) && !process.stderr.isTTY);
  try {
    const target = flags.attach ? attachDestination(src) : dst;
    const source = await openSource(src, flags, client);
    try {
      const dest = await openDestination(target, flags, client);
      if (flags.attach && !source.manifest) throw invalidArgument(`--attach: ${src} has no image manifest to attach to`);
      const formatVersion = Number(flags.formatVersion ?? DEFAULT_FORMAT_VERSION) as 1 | 2 | 3;
      const reuse: ReusableImage[] = [];
      const notices: string[] = [];
      if (formatVersion === 3) {
        // The image under the destination tag first (a reconversion reuses all it can), then every --dedup-with.
        const refs = [...(flags.attach ? [] : [target]), ...(flags.dedupWith ?? [])];
        for (const ref of refs) {
          const isDst = ref === target && !(flags.dedupWith ?? []).includes(ref);
          let img: SourceImage;
          try {
            img = await openSource(ref, flags, client);
          } catch (err) {
            if (isDst && isClass(err, 'NotFound')) continue; // nothing under the tag yet
            if (isDst) {
              notices.push(`the image under ${ref} could not be read for reuse (${describeError(err)}); converting without it`);
              continue;
            }
            throw invalidArgument(`--dedup-with ${ref}: ${describeError(err)}`, err);
          }
          try {
            const r = await readReusable(img);
            if ('skipped' in r) notices.push(r.skipped);
            else reuse.push(r);
          } finally {
            await img.close();
          }
        }
        if (!flags.json || process.stderr.isTTY) for (const n of notices) process.stderr.write(`gear convert: notice: ${n}\n`);
      }
      const summary = await convertImage(source, dest, {
        formatVersion,
        reuse,
        concurrency: Number(flags.concurrency),
        filesPerManifest: Number(flags.filesPerManifest),
        storage: flags.storage === 'raw' ? 'raw' : 'auto',
        ...(flags.rawAbove !== undefined ? { rawMinBytes: flags.rawAbove === 'off' ? Infinity : parseSize(flags.rawAbove) } : {}),
        tmpDir: flags.tmpDir,
        ...(flags.attach && source.manifest
          ? { attach: { subject: { mediaType: source.manifest.mediaType, digest: source.manifest.digest, size: source.manifest.bytes.length } } }
          : {}),
        progress: reporter.on,
      });
      if (summary.v3) {
        // The conversion's own notices (packs left out of the index) after those of the reuse lookup.
        if (!flags.json || process.stderr.isTTY) for (const n of summary.v3.notices) process.stderr.write(`gear convert: notice: ${n}\n`);
        summary.v3.notices = [...notices, ...summary.v3.notices];
      }
      return summary;
    } finally {
      await source.close();
    }
  } finally {
    reporter.stop();
    await client.close();
  }
}

export function registerConvert(program: Command): void {
  addMirrorOptions(program.command('convert'))
    .description('convert an image into a Gear image (index layer + deduplicated Gear files)')
    .argument('<src>', 'registry reference, docker-archive:FILE, oci:DIR[:TAG] or docker-daemon:IMAGE')
    .argument('[dst]', 'registry reference or oci:DIR[:TAG] (none with --attach)')
    .option('--attach', 'publish the Gear index as an OCI referrer of SRC (a registry image) in its repository; SRC\'s tag is left untouched and Gear nodes pulling SRC deploy it lazily')
    .option('--json', 'print a JSON summary on stdout')
    .option('--docker-host <url>', 'Docker Engine socket for docker-daemon: (default $DOCKER_HOST or unix:///var/run/docker.sock)')
    .option('--concurrency <n>', 'uploads in flight', '4')
    .option('--files-per-manifest <n>', 'Gear files per keep-alive manifest', '10000')
    .option('--tmp-dir <dir>', 'where file contents are staged during the conversion')
    .option('--location <registry/repository>', 'for oci: destinations: where the Gear files will be pushed')
    .option('--insecure-registry <host>', 'registry reachable over plain http (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--storage <mode>', 'how Gear files are stored: auto (gzip when it saves ≥10%) or raw', 'auto')
    .option('--raw-above <size>', 'store files of at least this size raw, so nodes can read them by range while they download ("off": gzip them too)', '8MiB')
    .option('--format-version <n>', 'Gear format version: 3 (packs of zstd members, big files chunked), 2 (one blob per file; for nodes whose gear reads at most version 2) or 1 (for nodes whose gear reads only version 1)', DEFAULT_FORMAT_VERSION)
    .option('--dedup-with <ref>', 'format 3: also reuse the packs of this Gear v3 image (registry reference or oci:DIR[:TAG]); files stored there are referenced, its packs mounted (same registry) or copied; repeatable', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--no-progress', 'no progress bars')
    .action(async (src: string, dstArg: string | undefined, flags: ConvertFlags) => {
      if (flags.attach && dstArg) throw invalidArgument('--attach publishes into the repository of SRC: give no DST');
      if (!flags.attach && !dstArg) throw invalidArgument('missing DST (a registry reference or oci:DIR[:TAG]), or use --attach');
      const dst = dstArg ?? '';
      if (flags.formatVersion !== undefined && !['1', '2', '3'].includes(flags.formatVersion)) {
        throw invalidArgument('--format-version must be 1, 2 or 3');
      }
      if (flags.dedupWith?.length && flags.formatVersion !== undefined && flags.formatVersion !== '3') {
        throw invalidArgument('--dedup-with reuses packs: it needs --format-version 3');
      }
      if (flags.storage !== undefined && flags.storage !== 'auto' && flags.storage !== 'raw') {
        throw invalidArgument('--storage must be auto or raw');
      }
      if (flags.rawAbove !== undefined && flags.rawAbove !== 'off') parseSize(flags.rawAbove); // names the bad input
      for (const [name, v] of [['--concurrency', flags.concurrency], ['--files-per-manifest', flags.filesPerManifest]] as const) {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1) throw invalidArgument(`${name} must be a positive integer`);
      }
      removeScratchOnSignals();
      try {
        const s = await runConvert(src, dst, flags);
        if (flags.json) process.stdout.write(`${JSON.stringify(s)}\n`);
        else {
          process.stdout.write(
            `${s.destination}@${s.manifestDigest}\n` +
              `  files ${s.files}, unique contents ${s.uniqueContents}, logical ${mb(s.logicalBytes)}\n` +
              (s.v3
                ? `  reused ${s.v3.reusedFiles} files (${mb(s.v3.reusedBytes)}) in ${s.v3.reusedPacks} existing pack(s) (${s.v3.packsMounted} mounted, ${s.v3.packsCopied} copied, ${s.v3.packsPresent} present); new packs ${s.v3.newPacks} (${mb(s.v3.newPackBytes)}), uploaded ${s.v3.packsUploaded} (${mb(s.v3.packBytesUploaded)})\n` +
                  `  ${(s.layerBytes / 1e6 / s.seconds).toFixed(1)} MB/s of uncompressed layers\n`
                : '') +
              `  uploaded ${mb(s.bytesUploaded)} (${s.blobsUploaded} blobs), already present ${mb(s.bytesSkipped)} (${s.blobsSkipped} blobs)\n` +
              `  index ${mb(s.indexSize)}, ${s.keepAliveManifests} keep-alive manifest(s), ${s.seconds.toFixed(1)} s\n` +
              (flags.attach ? `  attached to ${src} as an OCI referrer (its tag is unchanged); Gear nodes pulling ${src} deploy it lazily\n` : '') +
              (dst.startsWith('oci:')
                ? `  to a registry with its Gear files: gear copy ${dst} REGISTRY/REPO:TAG (skopeo copy / docker push move the index only)\n`
                : ''),
          );
        }
      } catch (err) {
        throw new Error(`convert ${src} → ${flags.attach ? 'attached referrer' : dst}: ${describeError(err)}`, { cause: err });
      }
    });
}
