/** `gear convert SRC DST`: turn an image into a Gear image (docs/format.md). */
import type { Command } from 'commander';

export function registerConvert(program: Command): void {
  program.command('convert').description('convert an image into a Gear image').argument('<src>').argument('<dst>');
}
