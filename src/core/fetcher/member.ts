/**
 * Decoding one pack member (docs/format.md §10): its stored bytes → its
 * bytes, bounded by the byte count the index gives (never more allocated),
 * checked against its sha256 before anyone sees them.
 *
 *   const bytes = decodeMember(stored, 'zstd', size, digest, 'fetch sha256:…');  // throws InvalidArgument "does not match"
 */
import { createHash } from 'node:crypto';
import { zstdDecompress } from '../sys/zstd.js';
import { describeError, invalidArgument } from '../errors.js';
import type { MemberEncoding } from './pack-types.js';

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
