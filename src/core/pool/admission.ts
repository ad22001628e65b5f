/**
 * What the pool lets stay, and the error of a full disk.
 *
 * Admission: the cap holds at rest. A file in use (pinned: being fetched,
 * opened by the miss filesystem) may take the pool over its cap, since
 * eviction never removes a pinned file, and a file larger than the whole cap
 * always does: it is admitted only while it is in use, so that the container
 * that opened it gets its bytes (through its descriptor, which survives the
 * unlink). When the last pin of a file goes and usage is above the high
 * watermark, the pool evicts at once (down to the low watermark, the released
 * file included), instead of waiting for the next write: a file larger than
 * the cap never stays ("1000 %" of a 1 MiB cap), and the next open of it
 * fetches it again.
 */
import { GearError } from '../errors.js';

/** What an eviction removed. */
export interface EvictResult {
  files: number;
  bytes: number;
}

/** Whether the release of a file's last pin must evict now: usage above the high watermark. */
export function mustEvictOnRelease(usedBytes: number, capBytes: number, highWatermark: number): boolean {
  return usedBytes > capBytes * highWatermark;
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
