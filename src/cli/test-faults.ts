/**
 * Test-only fault injection for the service processes (`gear daemon`,
 * `gear snapshotter`), off unless GEAR_TEST_FAULTS is set in the service's
 * own environment when it starts. Nothing a client sends (graph-driver or
 * gRPC call, FUSE request, registry answer) can turn a fault on: only
 * whoever starts the process (the environment) and root (the signal).
 *
 * GEAR_TEST_FAULTS is a comma-separated list of:
 *
 *   fatal-on-sigusr2  SIGUSR2 throws an uncaught exception on the main thread:
 *                     the real fatal path (log, abort the FUSE connections,
 *                     exit 1) with the process in whatever state it is.
 *   hang-shutdown     the orderly close on SIGTERM/SIGINT never finishes (as
 *                     if a call or the FUSE session hung): the shutdown bound
 *                     (GEAR_SHUTDOWN_TIMEOUT) must still end the process.
 *
 * Unknown names are an error at start, so a typo does not make a test pass.
 */
import type { Logger } from 'pino';
import { invalidArgument } from '../core/errors.js';

export const TEST_FAULTS = ['fatal-on-sigusr2', 'hang-shutdown'] as const;
export type TestFault = (typeof TEST_FAULTS)[number];

export interface Faults {
  /** The service as runAsService sees it (with hang-shutdown: a close() that never settles). */
  wrap(server: Promise<{ close(): Promise<void> }>): Promise<{ close(): Promise<void> }>;
}

export function testFaults(logger: Logger, env: NodeJS.ProcessEnv = process.env): Faults {
  const names = (env.GEAR_TEST_FAULTS ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  for (const n of names) {
    if (!(TEST_FAULTS as readonly string[]).includes(n)) {
      throw invalidArgument(`GEAR_TEST_FAULTS: unknown fault ${JSON.stringify(n)} (known: ${TEST_FAULTS.join(', ')})`);
    }
  }
  const on = new Set(names as TestFault[]);
  if (on.size > 0) logger.warn({ faults: [...on] }, 'test fault injection is on (GEAR_TEST_FAULTS); never set this in production');
  if (on.has('fatal-on-sigusr2')) {
    process.on('SIGUSR2', () => {
      setImmediate(() => {
        throw new Error('injected fatal error (GEAR_TEST_FAULTS=fatal-on-sigusr2, SIGUSR2)');
      });
    });
  }
  return {
    wrap: (server) =>
      on.has('hang-shutdown')
        ? server.then(() => ({ close: () => new Promise<void>(() => undefined) }))
        : server,
  };
}
