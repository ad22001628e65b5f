/**
 * Decoding one pack member (docs/format.md §10): its stored bytes → its
 * bytes, bounded by the byte count the index gives (never more allocated),
 * checked against its sha256 before anyone sees them.
 *
 *   const bytes = decodeMember(stored, 'zstd', size, digest, 'fetch sha256:…');  // throws InvalidArgument "does not match"
 */
import { createHash } from 'node:crypto';
import { decompress as fzstdDecompress } from 'fzstd';
import { describeError, invalidArgument } from '../errors.js';
import type { MemberEncoding } from './pack-types.js';

/**
 * zstd: exactly one frame whose content is exactly `size` bytes. Until the
 * native binding (sys/zstd.ts) is on this branch, fzstd (already a dependency,
 * decode only) decodes into a buffer of exactly `size` bytes: more output
 * fails, less is caught below.
 */
function zstdDecompress(src: Uint8Array, size: number): Buffer {
  const out = Buffer.allocUnsafe(size);
  const got = fzstdDecompress(src, out);
  if (got.length !== size || got.buffer !== out.buffer) throw new Error(`decompressed ${got.length} bytes, expected ${size}`);
  return out;
}

/** The member's bytes, verified; InvalidArgument ("does not match") when they are not what the index says. */
export function decodeMember(stored: Buffer, encoding: MemberEncoding, size: number, digest: string, what: string): Buffer {
  let bytes: Buffer;
  if (encoding === 'raw') {
    bytes = stored;
  } else {
    try {
      bytes = zstdDecompress(stored, size);
    } catch (err) {
      throw invalidArgument(`${what}: stored member does not match (bad zstd frame for ${size} bytes: ${describeError(err)})`, err);
    }
  }
  if (bytes.length !== size) throw invalidArgument(`${what}: content does not match: ${bytes.length} bytes, expected ${size}`);
  const got = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
  if (got !== digest) throw invalidArgument(`${what}: content does not match its digest (got ${got})`);
  return bytes;
}
