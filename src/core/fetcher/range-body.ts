/**
 * One HTTP Range request of a pack, handed out member by member as its bytes
 * arrive (pack-fetch.ts: members of many files; chunked.ts: chunks of one
 * big file). The request asks for bytes [first member's offset, last
 * member's end) into one buffer; each member is handed to `onMember` (in
 * offset order, awaited) as soon as its last byte is in. A registry that
 * ignores Range (200 with the whole blob) still works: the registry client
 * skips to the start, and this stops reading at the end it needs and drops
 * the connection.
 */
import { unavailable } from '../errors.js';
import type { RegistryClient } from '../registry/client.js';
import type { PackLoc } from './pack-types.js';

export interface RangeBodyDeps {
  client: Pick<RegistryClient, 'openBlob'>;
  /** Updated in place: requests sent, bytes received (gaps included). */
  counters: { packRequests: number; blobBytes: number };
}

/**
 * Reads `members` (sorted by offset, of one pack) with one Range request.
 * Rejects when the request fails or the body ends early; the members handed
 * out before that stay handed out.
 */
export async function readPackRange<M extends { offset: number; length: number }>(
  deps: RangeBodyDeps,
  repo: string,
  pack: PackLoc,
  members: readonly M[],
  signal: AbortSignal,
  onMember: (member: M, stored: Buffer) => Promise<void> | void,
): Promise<void> {
  if (members.length === 0) return;
  const start = members[0]!.offset;
  const end = members.reduce((e, m) => Math.max(e, m.offset + m.length), 0);
  let received = 0;
  try {
    const { stream } = await deps.client.openBlob(repo, pack.digest, { signal, expectedSize: pack.size, range: { start, end: end - 1 } });
    deps.counters.packRequests++;
    const buf = Buffer.allocUnsafe(end - start);
    let filled = 0;
    let next = 0;
    try {
      for await (const c of stream as AsyncIterable<Buffer>) {
        const n = Math.min(c.length, buf.length - filled);
        c.copy(buf, filled, 0, n);
        filled += n;
        received += c.length;
        while (next < members.length && members[next]!.offset + members[next]!.length - start <= filled) {
          const m = members[next++]!;
          await onMember(m, buf.subarray(m.offset - start, m.offset - start + m.length));
        }
        if (filled >= buf.length) break; // a registry ignoring Range: stop at what we need
      }
    } finally {
      stream.destroy();
    }
    if (next < members.length) throw unavailable(`GET pack ${pack.digest} from ${repo}: the body ended after ${filled} of ${buf.length} bytes`);
  } finally {
    deps.counters.blobBytes += received;
  }
}
