#!/usr/bin/env node
/**
 * The gear command. Each subcommand lives in its own module and registers
 * itself on the program.
 */
import { Command } from 'commander';
import { registerDaemon } from './daemon.js';
import { registerCache } from './cache.js';
import { registerConvert } from './convert.js';
import { registerCopy } from './copy.js';
import { registerPrefetch } from './prefetch.js';
import { registerSnapshotter } from './snapshotter.js';

const program = new Command();
program
  .name('gear')
  .description('Lazy, file-deduplicated container images on a stock Linux kernel')
  .version('0.1.0')
  .showHelpAfterError();

registerDaemon(program);
registerCache(program);
registerConvert(program);
registerCopy(program);
registerPrefetch(program);
registerSnapshotter(program);

program.parseAsync(process.argv).catch((err: unknown) => {
  process.stderr.write(`gear: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(1);
});
