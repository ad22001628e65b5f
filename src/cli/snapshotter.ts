/**
 * `gear snapshotter`: serves the containerd snapshotter (a proxy plugin,
 * containerd.services.snapshots.v1) on a unix socket.
 *
 * Gear images are lazy here as with `gear daemon` (same flags and
 * environment): the miss filesystem is mounted at ROOT/miss and a Gear file
 * is fetched from its registry the first time a container opens it.
 * Registry credentials: $DOCKER_CONFIG, else ~/.docker/config.json.
 *
 * On SIGTERM/SIGINT it stops accepting, lets in-flight calls finish
 * (bounded), removes the socket, unmounts the miss filesystem and exits 0.
 * It unmounts nothing else: containerd performs and owns every mount of a
 * snapshot.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { createLogger, isLogLevel, LOG_LEVELS, type LogLevel } from '../core/log.js';
import { addLazyOptions, storeOptionsFrom, type LazyFlags } from './lazy-options.js';
import { runAsService } from './service.js';

export const DEFAULT_SNAPSHOTTER_SOCKET = '/run/gear/snapshotter.sock';
export const DEFAULT_ROOT = '/var/lib/gear';

interface SnapshotterOptions extends LazyFlags {
  socket: string;
  root: string;
  logLevel: LogLevel;
}

function parseLevel(value: string): LogLevel {
  if (!isLogLevel(value)) throw new InvalidArgumentError(`expected one of ${LOG_LEVELS.join(', ')}`);
  return value;
}

export function registerSnapshotter(program: Command): void {
  const cmd = program
    .command('snapshotter')
    .description('serve the containerd snapshotter (proxy plugin, snapshots.v1) on a unix socket')
    .addOption(
      new Option('--socket <path>', 'unix socket to listen on (containerd: proxy_plugins.<name>.address)')
        .env('GEAR_SNAPSHOTTER_SOCKET')
        .default(DEFAULT_SNAPSHOTTER_SOCKET),
    )
    .addOption(new Option('--root <dir>', 'store root').env('GEAR_ROOT').default(DEFAULT_ROOT))
    .addOption(
      new Option('--log-level <level>', `log level (${LOG_LEVELS.join(', ')})`)
        .env('GEAR_LOG_LEVEL')
        .default('info')
        .argParser(parseLevel),
    );
  addLazyOptions(cmd).action(async (opts: SnapshotterOptions) => {
    await runSnapshotter(opts);
  });
}

async function runSnapshotter(opts: SnapshotterOptions): Promise<void> {
  const level = parseLevel(opts.logLevel); // the default is not passed through argParser
  const logger = createLogger({ level, name: 'gear-snapshotter' });

  // Loaded here, not at the top: other subcommands must not pay for (or break
  // on) the gRPC stack and the layer store.
  const { startSnapshotterServer } = await import('../frontends/snapshotter/server.js');
  await runAsService(
    logger,
    () => startSnapshotterServer({ socket: opts.socket, root: opts.root, logger, storeOptions: storeOptionsFrom(opts) }),
    'mounts belong to containerd',
  );
}
