/** `gear cache status|prune`: inspect and trim the node's file pool (level 1). */
import type { Command } from 'commander';

export function registerCache(program: Command): void {
  program.command('cache').description('inspect and prune the node file pool');
}
