/**
 * `gear daemon`: serves the Docker graph-driver plugin on a unix socket.
 *
 * On SIGTERM/SIGINT it stops accepting, lets in-flight requests finish
 * (bounded), removes the socket and exits 0. It does NOT unmount layers:
 * running containers keep using them, and dockerd calls
 * /GraphDriver.Cleanup itself when it shuts down.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { parseDuration } from '../core/fetcher/fetcher.js';
import { createLogger, isLogLevel, LOG_LEVELS, type LogLevel } from '../core/log.js';
import { runAsService } from './service.js';
import { startGraphDriverServer } from '../frontends/graphdriver/server.js';

export const DEFAULT_SOCKET = '/run/docker/plugins/gear.sock';

interface DaemonOptions {
  socket: string;
  root?: string;
  logLevel: LogLevel;
  lazy: boolean;
  cacheSize?: string;
  fetchTimeout?: number;
  maxFetches?: number;
  insecureRegistry: string[];
}

function parseFetchTimeout(value: string): number {
  try {
    return parseDuration(value, 'fetch timeout');
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function parsePositiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError('expected a positive integer');
  return n;
}

function collectRegistries(value: string, previous: string[]): string[] {
  return [...previous, ...value.split(',').map((s) => s.trim()).filter(Boolean)];
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
    .addOption(new Option('--no-lazy', 'do not mount the miss filesystem (Gear files then come only from the pool)'))
    .addOption(new Option('--cache-size <size>', 'cap of the Gear file pool, e.g. 20GiB (default: previous run\'s, else 20GiB)').env('GEAR_CACHE_SIZE'))
    .addOption(
      new Option('--fetch-timeout <duration>', 'deadline of a lazy fetch; a reader then gets EIO (e.g. 60s, 500ms)')
        .env('GEAR_FETCH_TIMEOUT')
        .argParser(parseFetchTimeout),
    )
    .addOption(new Option('--max-fetches <n>', 'lazy downloads in flight at most (default 8)').env('GEAR_MAX_FETCHES').argParser(parsePositiveInt))
    .addOption(
      new Option('--insecure-registry <host[:port]>', 'registry reachable over plain http (repeatable; loopback always is)')
        .env('GEAR_INSECURE_REGISTRIES')
        .argParser(collectRegistries)
        .default([]),
    )
    .action(async (opts: DaemonOptions) => {
      await runDaemon(opts);
    });
}

async function runDaemon(opts: DaemonOptions): Promise<void> {
  const level = parseLevel(opts.logLevel); // the default is not passed through argParser
  const logger = createLogger({ level, name: 'gear-daemon' });

  const started = startGraphDriverServer({
    socket: opts.socket,
    ...(opts.root ? { root: opts.root } : {}),
    logger,
    storeOptions: {
      lazy: opts.lazy
        ? {
            ...(opts.cacheSize ? { cacheSize: opts.cacheSize } : {}),
            ...(opts.fetchTimeout ? { fetchTimeoutMs: opts.fetchTimeout } : {}),
            ...(opts.maxFetches ? { maxFetches: opts.maxFetches } : {}),
            insecureRegistries: opts.insecureRegistry,
          }
        : false,
    },
  });
  // Installed while the (possibly slow) start runs, so an early signal is a clean stop too.
  runAsService(logger, started, 'layers stay mounted');
  await started;
}
