/**
 * What every long-running gear service (daemon, snapshotter) does with its
 * process: log and survive stray rejections, exit on an uncaught exception,
 * and stop cleanly on SIGTERM/SIGINT (a second signal exits at once).
 *
 * Every exit goes through exitProcess(): a miss filesystem still mounted has
 * a thread blocked in read(2) on /dev/fuse, and process.exit() would wait for
 * it forever (still holding the socket and the mount, answering nothing, so
 * no supervisor restarts the service and container reads hang). So the FUSE
 * connections are aborted first (callers blocked on them get an error), and
 * if a reader still does not end, the process kills itself.
 *
 * Bounds: an orderly shutdown gets GEAR_SHUTDOWN_TIMEOUT (default 30 s; e.g.
 * "30s", "500ms"), then the process exits as on a fatal error; a fatal exit
 * takes at most FATAL_EXIT_BOUND_MS.
 */
import type { Logger } from 'pino';
import { describeError } from '../core/errors.js';
import { parseDuration } from '../core/duration.js';
import { abortAllSessions, liveSessions } from '../core/missfs/index.js';
import { testFaults } from './test-faults.js';

export interface Closable {
  close(): Promise<void>;
}

/** Default bound on an orderly shutdown (SIGTERM/SIGINT). */
export const DEFAULT_SHUTDOWN_TIMEOUT_MS = 30_000;
/** Bound on the reader threads ending once their connections were aborted; then the process kills itself. */
export const FATAL_EXIT_BOUND_MS = 3_000;

let exiting = false;

/**
 * Ends the process with `code`, whatever state it is in: aborts the FUSE
 * connections of miss filesystems still mounted (none after an orderly
 * close), waits (bounded) for their reader threads, then process.exit(); if a
 * reader is still blocked, SIGKILL (process.exit() would hang on it).
 */
export function exitProcess(logger: Logger, code: number): void {
  if (exiting) return;
  exiting = true;
  if (liveSessions().length === 0) process.exit(code);
  // A backstop in case the wait below never gets its turn (it is a timer too, but armed first).
  const backstop = setTimeout(() => killSelf(logger), FATAL_EXIT_BOUND_MS + 500);
  void abortAllSessions(logger, FATAL_EXIT_BOUND_MS).then((ended) => {
    if (!ended) return killSelf(logger);
    clearTimeout(backstop);
    process.exit(code);
  });
}

function killSelf(logger: Logger): void {
  logger.fatal(
    { sessions: liveSessions().map((s) => s.mountpoint) },
    'a FUSE reader thread did not end after its connection was aborted; killing the process',
  );
  process.kill(process.pid, 'SIGKILL');
}

function shutdownTimeoutMs(logger: Logger): number {
  const v = process.env.GEAR_SHUTDOWN_TIMEOUT;
  if (!v) return DEFAULT_SHUTDOWN_TIMEOUT_MS;
  try {
    return parseDuration(v, 'GEAR_SHUTDOWN_TIMEOUT');
  } catch (err) {
    logger.warn({ err: describeError(err) }, `ignoring GEAR_SHUTDOWN_TIMEOUT; using ${DEFAULT_SHUTDOWN_TIMEOUT_MS} ms`);
    return DEFAULT_SHUTDOWN_TIMEOUT_MS;
  }
}

/**
 * Installs the handlers, then starts the service with `start`. A signal may
 * come while it is still starting: the stop then waits for it and closes it.
 * `what` is logged on shutdown. Returns the started service (a failed start
 * rejects: the caller reports it).
 */
export function runAsService<T extends Closable>(logger: Logger, start: () => Promise<T>, what: string): Promise<T> {
  const faults = testFaults(logger);
  const started = start();
  const server = faults.wrap(started);
  // A stray rejection must not take the node's storage down.
  process.on('unhandledRejection', (err) => logger.error({ err: describeError(err) }, 'unhandled rejection'));
  process.on('uncaughtException', (err) => {
    logger.fatal({ err: describeError(err), stack: err.stack }, 'uncaught exception; exiting');
    exitProcess(logger, 1);
  });
  // A failed start is reported by the caller awaiting `server`; here it only must not go unhandled.
  server.catch(() => undefined);

  const boundMs = shutdownTimeoutMs(logger);
  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) {
      logger.warn({ signal }, 'second signal; exiting now');
      exitProcess(logger, 1);
      return;
    }
    stopping = true;
    logger.info({ signal, boundMs }, `shutting down (${what})`);
    const overrun = setTimeout(() => {
      logger.error({ boundMs }, 'orderly shutdown did not finish in time (GEAR_SHUTDOWN_TIMEOUT); exiting now');
      exitProcess(logger, 1);
    }, boundMs);
    server
      .then((s) => s.close())
      .then(
        () => {
          clearTimeout(overrun);
          exitProcess(logger, 0);
        },
        (err: unknown) => {
          clearTimeout(overrun);
          logger.error({ err: describeError(err) }, 'shutdown failed');
          exitProcess(logger, 1);
        },
      );
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  return started;
}
