/**
 * `gear daemon`: serves the Docker graph-driver plugin on a unix socket.
 *
 * On SIGTERM/SIGINT it stops accepting, lets in-flight requests finish
 * (bounded), removes the socket and exits 0. It does NOT unmount layers:
 * running containers keep using them, and dockerd calls
 * /GraphDriver.Cleanup itself when it shuts down.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { createLogger, isLogLevel, LOG_LEVELS, type LogLevel } from '../core/log.js';
import { addLazyOptions, cliParser, storeOptionsFrom, type LazyFlags } from './lazy-options.js';
import { parseDuration } from '../core/duration.js';
import { runAsService } from './service.js';
import { startGraphDriverServer } from '../frontends/graphdriver/server.js';

export const DEFAULT_SOCKET = '/run/docker/plugins/gear.sock';

interface DaemonOptions extends LazyFlags {
  socket: string;
  root?: string;
  logLevel: LogLevel;
  bodyIdleTimeout?: number;
}

function parseLevel(value: string): LogLevel {
  if (!isLogLevel(value)) throw new InvalidArgumentError(`expected one of ${LOG_LEVELS.join(', ')}`);
  return value;
}

export function registerDaemon(program: Command): void {
  const cmd = program
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
    .addOption(
      new Option(
        '--body-idle-timeout <duration>',
        'fail a call (and free its layer) when its request body (the ApplyDiff tar) sends nothing this long, e.g. 120s; 0: never',
      )
        .env('GEAR_BODY_IDLE_TIMEOUT')
        .argParser(cliParser((v) => (v === '0' ? 0 : parseDuration(v, 'body idle timeout')))),
    );
  addLazyOptions(cmd).action(async (opts: DaemonOptions) => {
    await runDaemon(opts);
  });
}

async function runDaemon(opts: DaemonOptions): Promise<void> {
  const level = parseLevel(opts.logLevel); // the default is not passed through argParser
  const logger = createLogger({ level, name: 'gear-daemon' });

  // The handlers are installed before the (possibly slow) start runs, so an early signal is a clean stop too.
  await runAsService(
    logger,
    () =>
      startGraphDriverServer({
        socket: opts.socket,
        ...(opts.root ? { root: opts.root } : {}),
        logger,
        storeOptions: storeOptionsFrom(opts),
        ...(opts.bodyIdleTimeout !== undefined ? { bodyIdleTimeoutMs: opts.bodyIdleTimeout } : {}),
      }),
    'layers stay mounted',
  );
}
