/**
 * What the pool lets in, and the error of a full disk.
 *
 * Admission: a file larger than the pool's cap is never admitted (docs:
 * reliability, "bytes over the cap: goal 0"). Committing it would put the
 * pool over its cap with a file that eviction cannot remove while it is in
 * use, and reserving room for it would first evict everything else. The
 * refusal happens before any byte is fetched or written, with an error that
 * names the file, the cap and the setting to change. A hostile index that
 * declares a huge size for a small file (to flush the cache) is refused the
 * same way.
 */
import { failedPrecondition, GearError } from '../errors.js';
import type { EvictResult } from './pool.js';
import { formatSize } from './size.js';

/** Throws FailedPrecondition when a file of `size` bytes may not enter a pool capped at `capBytes`. */
export function checkAdmission(digest: string, size: number | undefined, capBytes: number): void {
  if (size === undefined || size <= capBytes) return;
  throw failedPrecondition(
    `pool write ${digest}: the file is ${formatSize(size)} (${size} bytes), larger than the whole pool cap of ${formatSize(capBytes)}; ` +
      `it cannot be cached: raise the cap (--cache-size / GEAR_CACHE_SIZE) above ${formatSize(size)}`,
  );
}

/**
 * Not enough disk space for a write. The staging file is gone; `freed` says
 * what eviction released, so a caller that can replay its data may retry.
 */
export class PoolNoSpaceError extends GearError {
  constructor(
    message: string,
    readonly freed: EvictResult,
    cause: unknown,
  ) {
    super('Unavailable', message, { cause });
    this.name = 'PoolNoSpaceError';
  }
}
