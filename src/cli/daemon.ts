/**
 * `gear daemon`: serves the Docker graph-driver plugin on a unix socket.
 *
 * On SIGTERM/SIGINT it stops accepting, lets in-flight requests finish
 * (bounded), removes the socket and exits 0. It does NOT unmount layers:
 * running containers keep using them, and dockerd calls
 * /GraphDriver.Cleanup itself when it shuts down.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { describeError } from '../core/errors.js';
import { createLogger, isLogLevel, LOG_LEVELS, type LogLevel } from '../core/log.js';
import { startGraphDriverServer, type GraphDriverServer } from '../frontends/graphdriver/server.js';

export const DEFAULT_SOCKET = '/run/docker/plugins/gear.sock';

interface DaemonOptions {
  socket: string;
  root?: string;
  logLevel: LogLevel;
}

function parseLevel(value: string): LogLevel {
  if (!isLogLevel(value)) throw new InvalidArgumentError(`expected one of ${LOG_LEVELS.join(', ')}`);
  return value;
}

export function registerDaemon(program: Command): void {
  program
    .command('daemon')
    .description('serve the Docker graph-driver plugin on a unix socket')
    .addOption(
      new Option('--socket <path>', 'unix socket to listen on').env('GEAR_SOCKET').default(DEFAULT_SOCKET),
    )
    .addOption(
      new Option('--root <dir>', 'store root (default: the Home that dockerd sends in GraphDriver.Init)').env(
        'GEAR_ROOT',
      ),
    )
    .addOption(
      new Option('--log-level <level>', `log level (${LOG_LEVELS.join(', ')})`)
        .env('GEAR_LOG_LEVEL')
        .default('info')
        .argParser(parseLevel),
    )
    .action(async (opts: DaemonOptions) => {
      await runDaemon(opts);
    });
}

async function runDaemon(opts: DaemonOptions): Promise<void> {
  const level = parseLevel(opts.logLevel); // the default is not passed through argParser
  const logger = createLogger({ level, name: 'gear-daemon' });

  // A stray rejection must not take the daemon (and dockerd's storage) down.
  process.on('unhandledRejection', (err) => logger.error({ err: describeError(err) }, 'unhandled rejection'));
  process.on('uncaughtException', (err) => {
    logger.fatal({ err: describeError(err), stack: err.stack }, 'uncaught exception; exiting');
    process.exit(1);
  });

  // Handlers go in before the (possibly slow) start, so an early signal is a clean stop too.
  let started: Promise<GraphDriverServer> | undefined;
  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) {
      logger.warn({ signal }, 'second signal; exiting now');
      process.exit(1);
    }
    stopping = true;
    logger.info({ signal }, 'shutting down (layers stay mounted)');
    (started ?? Promise.reject(new Error('server not started')))
      .then((server) => server.close())
      .then(
        () => process.exit(0),
        (err: unknown) => {
          logger.error({ err: describeError(err) }, 'shutdown failed');
          process.exit(1);
        },
      );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);

  started = startGraphDriverServer({
    socket: opts.socket,
    ...(opts.root ? { root: opts.root } : {}),
    logger,
  });
  await started;
}
