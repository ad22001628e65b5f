/**
 * What every long-running gear service (daemon, snapshotter) does with its
 * process: log and survive stray rejections, exit on an uncaught exception,
 * and stop cleanly on SIGTERM/SIGINT (a second signal exits at once).
 */
import type { Logger } from 'pino';
import { describeError } from '../core/errors.js';

export interface Closable {
  close(): Promise<void>;
}

/**
 * Installs the handlers. `server` may still be starting when a signal comes:
 * the stop then waits for it and closes it. `what` is logged on shutdown.
 */
export function runAsService(logger: Logger, server: Promise<Closable>, what: string): void {
  // A stray rejection must not take the node's storage down.
  process.on('unhandledRejection', (err) => logger.error({ err: describeError(err) }, 'unhandled rejection'));
  process.on('uncaughtException', (err) => {
    logger.fatal({ err: describeError(err), stack: err.stack }, 'uncaught exception; exiting');
    process.exit(1);
  });
  // A failed start is reported by the caller awaiting `server`; here it only must not go unhandled.
  server.catch(() => undefined);

  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    if (stopping) {
      logger.warn({ signal }, 'second signal; exiting now');
      process.exit(1);
    }
    stopping = true;
    logger.info({ signal }, `shutting down (${what})`);
    server
      .then((s) => s.close())
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
}
