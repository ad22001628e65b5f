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

// A service loads only its own module: a restarted daemon must answer dockerd as soon as it can, and the
// converter's modules (~150 ms to load) are no part of it.
const sub = process.argv[2];
if (sub === 'daemon') (await import('./daemon.js')).registerDaemon(program);
else if (sub === 'snapshotter') (await import('./snapshotter.js')).registerSnapshotter(program);
else {
  (await import('./daemon.js')).registerDaemon(program);
  (await import('./cache.js')).registerCache(program);
  (await import('./convert.js')).registerConvert(program);
  (await import('./analyze.js')).registerAnalyze(program);
  (await import('./copy.js')).registerCopy(program);
  (await import('./prefetch.js')).registerPrefetch(program);
  (await import('./snapshotter.js')).registerSnapshotter(program);
  (await import('./stats.js')).registerStats(program);
}

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`gear: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
