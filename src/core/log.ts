/**
 * The shared logger factory. Core code never creates loggers or prints; it
 * takes a pino `Logger` as an option (usually a child of the one made here by
 * the CLI) so that every component logs structured lines to one destination.
 */
import pino, { type DestinationStream, type Logger } from 'pino';

export type { Logger } from 'pino';

/** The levels a user may ask for (--log-level, GEAR_LOG_LEVEL). */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function isLogLevel(s: string): s is LogLevel {
  return (LOG_LEVELS as readonly string[]).includes(s);
}

export interface LoggerOptions {
  /** Minimum level; default "info". */
  level?: LogLevel;
  /** The component name carried on every line (e.g. "gear-daemon"). */
  name?: string;
  /** Where lines go; default stderr (synchronous, so nothing is lost on exit), keeping stdout free. */
  destination?: DestinationStream;
}

export function createLogger(opts: LoggerOptions = {}): Logger {
  return pino(
    {
      level: opts.level ?? 'info',
      ...(opts.name !== undefined ? { name: opts.name } : {}),
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    opts.destination ?? pino.destination({ fd: 2, sync: true }),
  );
}

/** A logger that drops everything (tests, library defaults). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
