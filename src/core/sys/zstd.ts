/**
 * zstd over Debian's libzstd (native/gear_native.cc): the member encoding of
 * format version 3 (docs/format.md §10). Synchronous, on the calling thread:
 * fine on the main thread for members up to a few MiB; bulk work (converting
 * an image) belongs on worker threads, where the addon loads as well (each
 * thread keeps its own zstd contexts).
 */
import { invalidArgument, internal } from '../errors.js';
import { native } from './native.js';

/** The level `gear convert` compresses members with (docs/format.md §10.4). */
export const ZSTD_DEFAULT_LEVEL = 3;
/** The largest `size` zstdDecompress accepts (a member is at most 64 MiB). */
export const ZSTD_MAX_DECOMPRESSED_SIZE: number = native.zstd.maxDecompressedSize;
export const ZSTD_MIN_LEVEL: number = native.zstd.minLevel;
export const ZSTD_MAX_LEVEL: number = native.zstd.maxLevel;
/** libzstd's version ("1.5.4"). */
export const ZSTD_VERSION: string = native.zstd.version;

function isZstdError(err: unknown): err is Error {
  return err instanceof Error && (err as Error & { code?: unknown }).code === 'ERR_GEAR_ZSTD';
}

/**
 * src as exactly one zstd frame at `level` (1 … 19 are the useful ones; 3 is
 * zstd's and Gear's default). The frame records its content size and has no
 * checksum (every member carries a sha256).
 */
export function zstdCompress(src: Uint8Array, level: number = ZSTD_DEFAULT_LEVEL): Buffer {
  if (!(src instanceof Uint8Array)) throw invalidArgument('zstd: the input must be a Uint8Array');
  if (!Number.isInteger(level) || level < ZSTD_MIN_LEVEL || level > ZSTD_MAX_LEVEL) {
    throw invalidArgument(`zstd: compression level ${level} is not a whole number from ${ZSTD_MIN_LEVEL} to ${ZSTD_MAX_LEVEL}`);
  }
  try {
    return native.zstdCompress(src, level);
  } catch (err) {
    // Only allocation failures get here: the arguments were checked above.
    throw internal(`zstd: cannot compress ${src.length} bytes`, err);
  }
}

/**
 * The `size` bytes that src, exactly one zstd frame, holds. Throws
 * InvalidArgument unless src is one whole zstd frame (no skippable frame, no
 * bytes before or after it) whose content is exactly `size` bytes; the output
 * buffer is allocated once, `size` bytes, and never grows.
 */
export function zstdDecompress(src: Uint8Array, size: number): Buffer {
  if (!(src instanceof Uint8Array)) throw invalidArgument('zstd: the input must be a Uint8Array');
  if (!Number.isInteger(size) || size < 0 || size > ZSTD_MAX_DECOMPRESSED_SIZE) {
    throw invalidArgument(
      `zstd: decompressed size ${size} is not a whole number from 0 to ${ZSTD_MAX_DECOMPRESSED_SIZE} bytes`,
    );
  }
  try {
    return native.zstdDecompress(src, size);
  } catch (err) {
    if (isZstdError(err)) throw invalidArgument(`${err.message} (${src.length} bytes in)`, err);
    throw internal(`zstd: cannot decompress ${src.length} bytes into ${size}`, err);
  }
}
