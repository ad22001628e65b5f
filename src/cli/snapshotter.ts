/**
 * `gear snapshotter`: serves the containerd snapshotter (proxy plugin) on a
 * unix socket. (Stub: the server lands next.)
 */
import type { Command } from 'commander';

export function registerSnapshotter(program: Command): void {
  program
    .command('snapshotter')
    .description('serve the containerd snapshotter (proxy plugin, snapshots.v1) on a unix socket')
    .action(() => {
      throw new Error('gear snapshotter is not implemented yet');
    });
}
