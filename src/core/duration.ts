/** Durations as settings give them (GEAR_FETCH_TIMEOUT, GEAR_SHUTDOWN_TIMEOUT, scrub intervals). */
import { invalidArgument } from './errors.js';

/** Parses GEAR_FETCH_TIMEOUT-style durations: "60", "60s", "500ms", "2m". */
export function parseDuration(input: string | number, what = 'duration'): number {
  if (typeof input === 'number') {
    if (!(Number.isFinite(input) && input > 0)) throw invalidArgument(`${what} ${input}: must be a positive number of ms`);
    return input;
  }
  const m = /^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$/.exec(input);
  if (!m) throw invalidArgument(`${what} ${JSON.stringify(input)}: expected e.g. 60, 60s, 500ms or 2m`);
  const n = Number(m[1]);
  const ms = n * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 } as const)[(m[2] ?? 's') as 'ms' | 's' | 'm' | 'h'];
  if (!(ms > 0)) throw invalidArgument(`${what} ${JSON.stringify(input)}: must be more than 0`);
  return Math.round(ms);
}
