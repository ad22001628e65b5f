import { Readable } from 'node:stream';

/**
 * The first bytes of a stream (at least n, unless it ends first), and a
 * stream that still yields every byte: the same one with the head pushed
 * back, or a new one when the input already ended.
 */
export async function peekHead(stream: Readable, n: number): Promise<{ head: Buffer; input: Readable }> {
  const chunks: Buffer[] = [];
  let len = 0;
  let ended = true;
  for await (const c of stream.iterator({ destroyOnReturn: false })) {
    const b = Buffer.isBuffer(c) ? c : Buffer.from(c as Uint8Array);
    chunks.push(b);
    len += b.length;
    if (len >= n) {
      ended = false;
      break;
    }
  }
  const head = Buffer.concat(chunks);
  if (ended) return { head, input: Readable.from([head]) };
  stream.unshift(head);
  return { head, input: stream };
}
