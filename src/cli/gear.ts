#!/usr/bin/env node
/**
 * The gear command. Each subcommand lives in its own module and registers
 * itself on the program.
 */
import { Command } from 'commander';

const program = new Command();
program
  .name('gear')
  .description('Lazy, file-deduplicated container images on a stock Linux kernel')
  .version('0.1.0')
  .showHelpAfterError();

// Each command loads only its own module: a restarted daemon must answer dockerd as soon as it can, and
// `gear convert` counts its own start against its MB/s (all the modules together take ~400 ms to load, the
// converter's alone ~150 ms). Help, --version and an unknown command load them all, so help lists every
// command and a typo is told the names.
const commands: Record<string, () => Promise<(p: Command) => void>> = {
  daemon: async () => (await import('./daemon.js')).registerDaemon,
  cache: async () => (await import('./cache.js')).registerCache,
  convert: async () => (await import('./convert.js')).registerConvert,
  analyze: async () => (await import('./analyze.js')).registerAnalyze,
  copy: async () => (await import('./copy.js')).registerCopy,
  prefetch: async () => (await import('./prefetch.js')).registerPrefetch,
  snapshotter: async () => (await import('./snapshotter.js')).registerSnapshotter,
  stats: async () => (await import('./stats.js')).registerStats,
};
const sub = process.argv[2];
const only = sub !== undefined && Object.hasOwn(commands, sub) ? [commands[sub]!] : Object.values(commands);
for (const load of only) (await load())(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`gear: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
