import type { Command } from 'commander';

/** `gear daemon`: the graph-driver plugin (placeholder until the frontend lands). */
export function registerDaemon(program: Command): void {
  program
    .command('daemon')
    .description('serve the Docker graph-driver plugin on a unix socket')
    .action(() => {
      throw new Error('not implemented yet');
    });
}
