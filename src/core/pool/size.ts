/**
 * Human byte sizes, as written in GEAR_CACHE_SIZE and `gear cache prune --to`.
 *
 * Accepted: a non-negative number (fractions allowed, rounded down to whole
 * bytes) with an optional unit, case-insensitive, optional space between:
 *   - none or `B`                     bytes
 *   - `KB` `MB` `GB` `TB` `PB`        powers of 1000 (SI)
 *   - `KiB` `MiB` `GiB` `TiB` `PiB`   powers of 1024 (IEC)
 *   - `K` `M` `G` `T` `P`             powers of 1024 (as `docker --memory`, `du -h`)
 * Examples: `20GiB`, `500MB`, `1MiB`, `1048576`, `1.5G`.
 */
import { invalidArgument } from '../errors.js';

const SIZE_RE = /^\s*(\d+(?:\.\d+)?|\.\d+)\s*(?:([kmgtp])(i?)(b?)|(b?))\s*$/i;
const POWER: Record<string, number> = { k: 1, m: 2, g: 3, t: 4, p: 5 };
const UNITS_HELP = 'B; KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB or K, M, G, T = powers of 1024';

/**
 * Parses a human size into bytes. Throws GearError InvalidArgument naming the
 * input and the accepted units when it cannot be parsed or does not fit a safe
 * integer.
 */
export function parseSize(input: string | number): number {
  if (typeof input === 'number') {
    if (Number.isSafeInteger(input) && input >= 0) return input;
    throw invalidArgument(`invalid size ${input}: want a non-negative whole number of bytes`);
  }
  const m = SIZE_RE.exec(input);
  if (!m) {
    throw invalidArgument(
      `invalid size ${JSON.stringify(input)}: want a number with an optional unit (${UNITS_HELP}), e.g. 20GiB`,
    );
  }
  const value = Number(m[1]);
  let multiplier = 1;
  const prefix = m[2]?.toLowerCase();
  if (prefix) {
    const binary = m[3] !== '' || m[4] === ''; // KiB, K → 1024; KB → 1000
    multiplier = (binary ? 1024 : 1000) ** POWER[prefix]!;
  }
  const bytes = Math.floor(value * multiplier);
  if (!Number.isSafeInteger(bytes)) throw invalidArgument(`invalid size ${JSON.stringify(input)}: too large`);
  return bytes;
}

/** Formats bytes for people, in IEC units with one decimal ("1.5 GiB", "512 B"). */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${v.toFixed(1)} ${units[i]}`;
}
