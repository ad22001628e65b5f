/**
 * `gear prefetch IMAGE [DST]`: set the prefetch list of a Gear image
 * (src/convert/prefetch.ts, docs/format.md §3.3).
 *
 *   gear prefetch --from-pool /var/lib/gear/pool registry:5000/app:gear
 *   gear prefetch --list files.txt registry:5000/app:gear registry:5000/app:gear-fast
 *   gear prefetch --clear registry:5000/app:gear
 */
import { addMirrorOptions, mirrorOptionsFrom, type MirrorFlags } from './registry-options.js';
import type { Command } from 'commander';
import { describeError, invalidArgument } from '../core/errors.js';
import { newRegistryClient } from '../convert/registry-adapter.js';
import { pathsFromPool, poolListNotices, readPathList, setPrefetch, type PrefetchSummary } from '../convert/prefetch.js';
import { openDestination, openSource } from './convert.js';

interface PrefetchFlags extends MirrorFlags {
  fromPool?: string;
  list?: string;
  clear?: boolean;
  insecureRegistry: string[];
  json?: boolean;
  tmpDir?: string;
}

/** Runs `gear prefetch` the way the CLI does; exported for tests and the benchmark. */
export async function runPrefetch(image: string, dst: string | undefined, flags: PrefetchFlags): Promise<PrefetchSummary> {
  const modes = [flags.fromPool !== undefined, flags.list !== undefined, Boolean(flags.clear)].filter(Boolean).length;
  if (modes !== 1) throw invalidArgument('give exactly one of --from-pool DIR, --list FILE or --clear');
  if (/^(docker-archive|docker-daemon):/.test(image)) throw invalidArgument(`${image}: gear prefetch reads a Gear image from a registry or oci:DIR[:TAG]`);
  const client = newRegistryClient({ insecureRegistries: flags.insecureRegistry, mirrors: mirrorOptionsFrom(flags) });
  try {
    const source = await openSource(image, { tmpDir: flags.tmpDir }, client);
    try {
      const dest = await openDestination(dst ?? image, {}, client);
      const notices: string[] = [];
      const summary = await setPrefetch(
        source,
        dest,
        async (manifest) => {
          if (flags.fromPool !== undefined) {
            for (const n of await poolListNotices(flags.fromPool, manifest)) notices.push(n);
            return pathsFromPool(flags.fromPool, manifest);
          }
          if (flags.list !== undefined) return readPathList(flags.list);
          return [];
        },
        flags.tmpDir ? { tmpDir: flags.tmpDir } : {},
      );
      return { ...summary, notices: [...summary.notices, ...notices] };
    } finally {
      await source.close();
    }
  } finally {
    await client.close();
  }
}

export function registerPrefetch(program: Command): void {
  addMirrorOptions(program.command('prefetch'))
    .description("set a Gear image's prefetch list: the files nodes fetch in the background right after the pull")
    .argument('<image>', 'the Gear image: registry reference or oci:DIR[:TAG]')
    .argument('[dst]', 'where to write the result (default: over <image>)')
    .option('--from-pool <dir>', "the files in this Gear pool (a node's <root>/pool), in the order it fetched them: run the image's task once on a node whose pool was empty (gear cache prune --all) and whose daemon runs with GEAR_READ_AHEAD=0 (else the pool also holds the neighbours read-ahead brought along), then point here")
    .option('--list <file>', 'the files named in this file, one path per line, in that order')
    .option('--clear', 'remove the list')
    .option('--insecure-registry <host>', 'registry reachable over plain http (repeatable)', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--tmp-dir <dir>', 'where the new index layer is written before upload')
    .option('--json', 'print a JSON summary on stdout')
    .action(async (image: string, dst: string | undefined, flags: PrefetchFlags) => {
      try {
        const s = await runPrefetch(image, dst, flags);
        if (!flags.json || process.stderr.isTTY) for (const n of s.notices) process.stderr.write(`gear prefetch: notice: ${n}\n`);
        if (flags.json) process.stdout.write(`${JSON.stringify(s)}\n`);
        else {
          process.stdout.write(
            `${s.destination}@${s.manifestDigest}\n` +
              `  prefetch ${s.prefetch} of ${s.files} files (${(s.prefetchBytes / 1e6).toFixed(1)} MB), ${s.seconds.toFixed(1)} s\n`,
          );
        }
      } catch (err) {
        throw new Error(`prefetch ${image}: ${describeError(err)}`, { cause: err });
      }
    });
}
