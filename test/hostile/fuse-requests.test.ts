/**
 * Deterministic corpus of hostile /dev/fuse request buffers (one named case
 * each, counted by `it.each`): every case goes through the decoder
 * (parseRequest + the opcode's argument decoder) and through the real
 * server's request handler (MissFsSession.onRequest, replies captured in a
 * file), after a valid INIT. Each case states the exact reply it must get:
 * the errno, or no reply at all for ops the kernel expects none for.
 */
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/core/log.js';
import { Errno, FuseProtocolError, IN_HEADER_SIZE, Op, parseOutHeader, parseRequest } from '../../src/core/missfs/protocol.js';
import { MissFsSession } from '../../src/core/missfs/server.js';
import type { MissProvider } from '../../src/core/missfs/types.js';

interface Hdr {
  len?: number;
  opcode: number;
  unique?: bigint;
  nodeid?: bigint;
  pid?: number;
  extlen?: number;
}

function req(h: Hdr, body: Buffer = Buffer.alloc(0), trailing: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(IN_HEADER_SIZE);
  b.writeUInt32LE((h.len ?? IN_HEADER_SIZE + body.length) >>> 0, 0);
  b.writeUInt32LE(h.opcode >>> 0, 4);
  b.writeBigUInt64LE(h.unique ?? 77n, 8);
  b.writeBigUInt64LE(h.nodeid ?? 1n, 16);
  b.writeUInt32LE(h.pid ?? 0, 32);
  b.writeUInt16LE(h.extlen ?? 0, 36);
  return Buffer.concat([b, body, trailing]);
}

function u32s(...v: number[]): Buffer {
  const b = Buffer.alloc(v.length * 4);
  v.forEach((x, i) => b.writeUInt32LE(x >>> 0, i * 4));
  return b;
}

function readIn(fh: bigint, offset: bigint, size: number): Buffer {
  const b = Buffer.alloc(40);
  b.writeBigUInt64LE(fh, 0);
  b.writeBigUInt64LE(offset, 8);
  b.writeUInt32LE(size >>> 0, 16);
  return b;
}

const HEX = 'ab'.padEnd(64, '0');
const cstr = (s: string) => Buffer.from(`${s}\0`, 'latin1');

/** expect: an errno (0 = success) or 'none' (no reply may be written). */
interface Case {
  name: string;
  buf: Buffer;
  expect: number | 'none';
}

const CASES: Case[] = [
  { name: 'empty read (0 bytes)', buf: Buffer.alloc(0), expect: 'none' },
  { name: '7 bytes: not even an opcode', buf: Buffer.alloc(7, 0xff), expect: 'none' },
  { name: '15 bytes: opcode but no unique', buf: Buffer.alloc(15, 1), expect: 'none' },
  { name: '39 bytes: header cut one byte short', buf: req({ opcode: Op.GETATTR }).subarray(0, 39), expect: Errno.EIO },
  { name: 'len 0', buf: req({ opcode: Op.GETATTR, len: 0 }), expect: Errno.EIO },
  { name: 'len 39 (below the header)', buf: req({ opcode: Op.GETATTR, len: 39 }), expect: Errno.EIO },
  { name: 'len larger than the read', buf: req({ opcode: Op.GETATTR, len: 4096 }), expect: Errno.EIO },
  { name: 'len 0xffffffff', buf: req({ opcode: Op.LOOKUP, len: 0xffffffff }, cstr('sha256')), expect: Errno.EIO },
  { name: 'extension length beyond len', buf: req({ opcode: Op.GETATTR, extlen: 1 }), expect: Errno.EIO },
  { name: 'extension length 0xffff', buf: req({ opcode: Op.LOOKUP, extlen: 0xffff }, cstr('sha256')), expect: Errno.EIO },
  { name: 'damaged header of a FORGET: no reply', buf: req({ opcode: Op.FORGET, len: 9999 }), expect: 'none' },
  { name: 'LOOKUP: unterminated name', buf: req({ opcode: Op.LOOKUP }, Buffer.from('sha256')), expect: Errno.EINVAL },
  { name: 'LOOKUP: empty name', buf: req({ opcode: Op.LOOKUP }, cstr('')), expect: Errno.EINVAL },
  { name: 'LOOKUP: name with a slash', buf: req({ opcode: Op.LOOKUP, nodeid: 2n }, cstr('ab/cd')), expect: Errno.EINVAL },
  { name: 'LOOKUP: 1025-byte name', buf: req({ opcode: Op.LOOKUP }, cstr('x'.repeat(1025))), expect: Errno.ENAMETOOLONG },
  { name: 'LOOKUP: NUL only past len (name cut by len)', buf: req({ opcode: Op.LOOKUP, len: IN_HEADER_SIZE + 6 }, cstr('sha256')), expect: Errno.EINVAL },
  { name: 'LOOKUP: ".." under the root', buf: req({ opcode: Op.LOOKUP }, cstr('..')), expect: Errno.ENOENT },
  { name: 'LOOKUP: uppercase hex prefix', buf: req({ opcode: Op.LOOKUP, nodeid: 2n }, cstr('AB')), expect: Errno.ENOENT },
  { name: 'LOOKUP: digest under the wrong prefix directory', buf: req({ opcode: Op.LOOKUP, nodeid: 16n + 0xcdn }, cstr(HEX)), expect: Errno.ENOENT },
  { name: 'LOOKUP: 63-hex name', buf: req({ opcode: Op.LOOKUP, nodeid: 16n + 0xabn }, cstr(HEX.slice(0, 63))), expect: Errno.ENOENT },
  { name: 'LOOKUP: parent is an unknown nodeid', buf: req({ opcode: Op.LOOKUP, nodeid: 0xdeadbeefn }, cstr('x')), expect: Errno.ENOENT },
  { name: 'LOOKUP: nodeid 2^64-1', buf: req({ opcode: Op.LOOKUP, nodeid: 2n ** 64n - 1n }, cstr('sha256')), expect: Errno.ENOENT },
  { name: 'LOOKUP: unknown digest (provider NotFound)', buf: req({ opcode: Op.LOOKUP, nodeid: 16n + 0xabn }, cstr(HEX)), expect: Errno.ENOENT },
  { name: 'GETATTR: unknown node', buf: req({ opcode: Op.GETATTR, nodeid: 0x1000n }), expect: Errno.ENOENT },
  { name: 'GETATTR: cut fuse_getattr_in (8 of 16 bytes; the server needs no argument)', buf: req({ opcode: Op.GETATTR }, Buffer.alloc(8)), expect: 0 },
  { name: 'OPEN: cut fuse_open_in', buf: req({ opcode: Op.OPEN, nodeid: 0x1000n }, Buffer.alloc(4)), expect: Errno.EINVAL },
  { name: 'OPEN: a directory', buf: req({ opcode: Op.OPEN, nodeid: 2n }, u32s(0, 0)), expect: Errno.EISDIR },
  { name: 'OPEN: unknown node for writing', buf: req({ opcode: Op.OPEN, nodeid: 0x1234n }, u32s(2, 0)), expect: Errno.ENOENT },
  { name: 'READ: unknown file handle', buf: req({ opcode: Op.READ, nodeid: 0x1000n }, readIn(99n, 0n, 4096)), expect: Errno.EBADF },
  { name: 'READ: offset beyond 2^53', buf: req({ opcode: Op.READ }, readIn(1n, 2n ** 60n, 4096)), expect: Errno.EINVAL },
  { name: 'READ: cut fuse_read_in (16 bytes)', buf: req({ opcode: Op.READ }, Buffer.alloc(16)), expect: Errno.EINVAL },
  { name: 'READDIR: size 0xffffffff on the root (clamped)', buf: req({ opcode: Op.READDIR, nodeid: 1n }, readIn(12345n, 0n, 0xffffffff)), expect: 0 },
  { name: 'READDIR: offset far past the end', buf: req({ opcode: Op.READDIR, nodeid: 1n }, readIn(0n, 2n ** 52n, 4096)), expect: 0 },
  { name: 'READDIR: on a file node id', buf: req({ opcode: Op.READDIR, nodeid: 0x1000n }, readIn(0n, 0n, 4096)), expect: Errno.ENOENT },
  { name: 'RELEASE: handle never opened', buf: req({ opcode: Op.RELEASE }, Buffer.alloc(24)), expect: 0 },
  { name: 'RELEASE: cut struct', buf: req({ opcode: Op.RELEASE }, Buffer.alloc(8)), expect: Errno.EINVAL },
  { name: 'GETXATTR: name without NUL', buf: req({ opcode: Op.GETXATTR }, Buffer.concat([u32s(64, 0), Buffer.from('trusted.overlay.opaque')])), expect: Errno.EINVAL },
  { name: 'GETXATTR: trusted.overlay.redirect', buf: req({ opcode: Op.GETXATTR }, Buffer.concat([u32s(64, 0), cstr('trusted.overlay.redirect')])), expect: Errno.ENODATA },
  { name: 'LISTXATTR: size 0xffffffff', buf: req({ opcode: Op.LISTXATTR }, u32s(0xffffffff, 0)), expect: 0 },
  { name: 'ACCESS: W_OK on the root', buf: req({ opcode: Op.ACCESS }, u32s(2, 0)), expect: Errno.EROFS },
  { name: 'ACCESS: cut struct (2 bytes)', buf: req({ opcode: Op.ACCESS }, Buffer.alloc(2)), expect: Errno.EINVAL },
  { name: 'BATCH_FORGET: count 2^32-1 with one entry: no reply', buf: req({ opcode: Op.BATCH_FORGET }, Buffer.concat([u32s(0xffffffff, 0), Buffer.alloc(16)])), expect: 'none' },
  { name: 'BATCH_FORGET: cut struct: no reply', buf: req({ opcode: Op.BATCH_FORGET }, Buffer.alloc(4)), expect: 'none' },
  { name: 'FORGET: of the root, huge nlookup: no reply', buf: req({ opcode: Op.FORGET, nodeid: 1n }, Buffer.alloc(8, 0xff)), expect: 'none' },
  { name: 'INTERRUPT: of a request that does not exist: no reply', buf: req({ opcode: Op.INTERRUPT }, Buffer.alloc(8, 0xee)), expect: 'none' },
  { name: 'INTERRUPT: cut struct: no reply', buf: req({ opcode: Op.INTERRUPT }, Buffer.alloc(3)), expect: 'none' },
  { name: 'INIT again with major 6', buf: req({ opcode: Op.INIT }, u32s(6, 1, 0, 0)), expect: Errno.EPROTO },
  { name: 'INIT: cut to 4 bytes', buf: req({ opcode: Op.INIT }, u32s(7)), expect: Errno.EINVAL },
  { name: 'MKDIR on a read-only filesystem', buf: req({ opcode: Op.MKDIR }, Buffer.concat([u32s(0o755, 0), cstr('x')])), expect: Errno.EROFS },
  { name: 'SETXATTR trusted.overlay.opaque', buf: req({ opcode: Op.SETXATTR }, Buffer.concat([u32s(1, 0), cstr('trusted.overlay.opaque'), Buffer.from('y')])), expect: Errno.EROFS },
  { name: 'unknown opcode 0', buf: req({ opcode: 0 }), expect: Errno.ENOSYS },
  { name: 'unknown opcode 0xffffffff', buf: req({ opcode: 0xffffffff }), expect: Errno.ENOSYS },
  { name: 'CUSE_INIT on a FUSE device', buf: req({ opcode: Op.CUSE_INIT }, u32s(7, 45, 0, 0)), expect: Errno.ENOSYS },
  { name: 'READLINK', buf: req({ opcode: Op.READLINK, nodeid: 0x1000n }), expect: Errno.EINVAL },
  { name: 'trailing bytes after len (GETATTR of the root)', buf: req({ opcode: Op.GETATTR }, Buffer.alloc(0), Buffer.alloc(100, 0x41)), expect: 0 },
];

class NoBlobs implements MissProvider {
  async lookup(digest: string): Promise<{ size: number }> {
    throw Object.assign(new Error(`unknown ${digest}`), { code: 'ENOENT' });
  }
  async open(): Promise<never> {
    throw Object.assign(new Error('no such blob'), { code: 'ENOENT' });
  }
}

let tmp: string;
let replies: string;
let fd: number;
const logger = silentLogger();

beforeAll(() => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'gear-hostile-fuse-'));
  replies = path.join(tmp, 'replies');
  fd = openSync(replies, 'a');
});

afterAll(() => {
  closeSync(fd);
  rmSync(tmp, { recursive: true, force: true });
});

function session(): { onRequest(b: Buffer): void; inflight: Map<bigint, unknown> } {
  const s = new MissFsSession(fd, path.join(tmp, 'mp'), { mountpoint: path.join(tmp, 'mp'), provider: new NoBlobs(), logger, passthrough: false }) as unknown as {
    onRequest(b: Buffer): void;
    inflight: Map<bigint, unknown>;
  };
  s.onRequest(req({ opcode: Op.INIT, unique: 1n }, u32s(7, 45, 1 << 20, 0)));
  return s;
}

describe(`hostile FUSE requests (${CASES.length} cases)`, () => {
  it('has at least 30 cases', () => {
    expect(CASES.length).toBeGreaterThanOrEqual(30);
  });

  it.each(CASES)('$name', async (c) => {
    // The decoder: a result or a FuseProtocolError, nothing else.
    let decodeErr: unknown;
    try {
      parseRequest(c.buf);
    } catch (err) {
      decodeErr = err;
    }
    if (decodeErr !== undefined) expect(decodeErr).toBeInstanceOf(FuseProtocolError);

    // The real handler: exactly the expected reply, for this request's unique.
    ftruncateSync(fd, 0);
    const s = session();
    const initReplyLen = readFileSync(replies).length;
    expect(() => s.onRequest(c.buf)).not.toThrow();
    for (let i = 0; i < 100 && s.inflight.size > 0; i++) await new Promise((r) => setImmediate(r));
    const out = readFileSync(replies).subarray(initReplyLen);
    if (c.expect === 'none') {
      expect(out.length).toBe(0);
    } else {
      const h = parseOutHeader(out);
      expect(h.unique).toBe(77n);
      expect(h.len).toBe(out.length); // exactly one reply
      expect(h.error === 0 ? 0 : -h.error).toBe(c.expect);
    }
    // A header the decoder refuses is answered EIO (when its unique and opcode are readable), nothing else.
    if (decodeErr !== undefined) expect(c.expect === 'none' || c.expect === Errno.EIO).toBe(true);
  });
});
