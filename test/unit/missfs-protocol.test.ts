/** FUSE wire codec: layouts, negotiation, and hostile/short input. */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  ATTR_OUT_SIZE,
  ENTRY_OUT_SIZE,
  Errno,
  FuseProtocolError,
  IN_HEADER_SIZE,
  INIT_OUT_SIZE,
  InitFlag,
  Op,
  S_IFDIR,
  S_IFREG,
  WRITE_OPS,
  direntType,
  encodeAttrOut,
  encodeDirents,
  encodeEntryOut,
  encodeError,
  encodeGetxattrOut,
  encodeInitOut,
  encodeOpenOut,
  encodeReply,
  encodeStatfsOut,
  isNoReplyOp,
  negotiateInit,
  opName,
  parseAccessIn,
  parseAttr,
  parseBatchForgetIn,
  parseDirents,
  parseFlushIn,
  parseForgetIn,
  parseGetattrIn,
  parseGetxattrIn,
  parseInitIn,
  parseInitOut,
  parseInterruptIn,
  parseName,
  parseOpenIn,
  parseOutHeader,
  parseReadIn,
  parseReleaseIn,
  parseRequest,
  peekUnique,
  readBufferSize,
  splitTimeout,
  type Attr,
  type InitPolicy,
} from '../../src/core/missfs/protocol.js';

function request(opcode: number, body: Buffer, opts: { unique?: bigint; nodeid?: bigint; len?: number; extlen?: number } = {}): Buffer {
  const b = Buffer.alloc(IN_HEADER_SIZE + body.length);
  b.writeUInt32LE(opts.len ?? b.length, 0);
  b.writeUInt32LE(opcode, 4);
  b.writeBigUInt64LE(opts.unique ?? 7n, 8);
  b.writeBigUInt64LE(opts.nodeid ?? 1n, 16);
  b.writeUInt32LE(1000, 24);
  b.writeUInt32LE(1001, 28);
  b.writeUInt32LE(4242, 32);
  b.writeUInt16LE(opts.extlen ?? 0, 36);
  body.copy(b, IN_HEADER_SIZE);
  return b;
}

const policy: InitPolicy = {
  maxWrite: 128 * 1024,
  maxReadahead: 1 << 20,
  maxPages: 256,
  maxBackground: 64,
  congestionThreshold: 48,
  wantFlags: InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.MAX_PAGES | InitFlag.PARALLEL_DIROPS,
};

function initIn(major: number, minor: number, flags: bigint, readahead = 131072): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(major, 0);
  b.writeUInt32LE(minor, 4);
  b.writeUInt32LE(readahead, 8);
  b.writeUInt32LE(Number(flags & 0xffffffffn), 12);
  b.writeUInt32LE(Number(flags >> 32n), 16);
  return b;
}

const fileAttr: Attr = {
  ino: 0x1234n,
  size: 5_000_000_123,
  atime: 1_700_000_000,
  mtime: 1_700_000_001,
  ctime: 1_700_000_002,
  mtimeNsec: 999,
  mode: S_IFREG | 0o444,
  nlink: 1,
  uid: 0,
  gid: 0,
};

describe('request header', () => {
  it('decodes every field and bounds the body by len', () => {
    const body = Buffer.from('sha256\0');
    const buf = Buffer.concat([request(Op.LOOKUP, body, { unique: 0x8000_0000_0000_0001n, nodeid: 99n }), Buffer.alloc(32, 0xee)]);
    buf.writeUInt32LE(IN_HEADER_SIZE + body.length, 0); // trailing bytes beyond len are ignored
    const r = parseRequest(buf);
    expect(r.header).toEqual({
      len: 47,
      opcode: Op.LOOKUP,
      unique: 0x8000_0000_0000_0001n,
      nodeid: 99n,
      uid: 1000,
      gid: 1001,
      pid: 4242,
      totalExtlen: 0,
    });
    expect(r.body.equals(body)).toBe(true);
    expect(parseName(r.body)).toBe('sha256');
  });

  it('rejects short buffers and lying length fields', () => {
    expect(() => parseRequest(Buffer.alloc(0))).toThrow(FuseProtocolError);
    expect(() => parseRequest(Buffer.alloc(39))).toThrow(FuseProtocolError);
    expect(() => parseRequest(request(Op.GETATTR, Buffer.alloc(16), { len: 39 }))).toThrow(/below the header/);
    expect(() => parseRequest(request(Op.GETATTR, Buffer.alloc(16), { len: 4096 }))).toThrow(/exceeds/);
    expect(() => parseRequest(request(Op.GETATTR, Buffer.alloc(16), { len: 0xffffffff }))).toThrow(/exceeds/);
    // Extensions cannot reach back into the header.
    expect(() => parseRequest(request(Op.CREATE, Buffer.alloc(16), { extlen: 3 }))).toThrow(/extension/);
    const ok = parseRequest(request(Op.CREATE, Buffer.alloc(24), { extlen: 1 }));
    expect(ok.body.length).toBe(16);
  });

  it('peeks the unique of damaged requests only when it is present', () => {
    expect(peekUnique(Buffer.alloc(15))).toBeNull();
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(1234n, 8);
    expect(peekUnique(b)).toBe(1234n);
  });
});

describe('argument structs', () => {
  it('names: NUL required, non-empty, no slash, bounded', () => {
    expect(parseName(Buffer.from('ab\0junk'))).toBe('ab');
    expect(() => parseName(Buffer.from('ab'))).toThrow(/NUL/);
    expect(() => parseName(Buffer.from('\0'))).toThrow(/empty/);
    expect(() => parseName(Buffer.from('a/b\0'))).toThrow(/\//);
    expect(() => parseName(Buffer.alloc(0))).toThrow(FuseProtocolError);
    const long = Buffer.concat([Buffer.alloc(2000, 0x61), Buffer.from([0])]);
    const e = (() => {
      try {
        parseName(long);
      } catch (err) {
        return err;
      }
    })() as FuseProtocolError;
    expect(e.errno).toBe(Errno.ENAMETOOLONG);
  });

  it('each struct rejects short input with FuseProtocolError', () => {
    const short = Buffer.alloc(7);
    for (const f of [
      () => parseInitIn(short),
      () => parseOpenIn(short),
      () => parseReadIn(Buffer.alloc(23)),
      () => parseReleaseIn(Buffer.alloc(15)),
      () => parseFlushIn(short),
      () => parseForgetIn(short),
      () => parseBatchForgetIn(short),
      () => parseGetxattrIn(short, false),
      () => parseInterruptIn(short),
      () => parseAccessIn(Buffer.alloc(3)),
      () => parseGetattrIn(Buffer.alloc(8)),
      () => parseAttr(Buffer.alloc(87)),
      () => parseInitOut(Buffer.alloc(23)),
      () => parseOutHeader(Buffer.alloc(15)),
    ]) {
      expect(f).toThrow(FuseProtocolError);
    }
  });

  it('read_in: fields, old 24-byte form, and out-of-range offsets', () => {
    const b = Buffer.alloc(40);
    b.writeBigUInt64LE(5n, 0);
    b.writeBigUInt64LE(1n << 40n, 8);
    b.writeUInt32LE(131072, 16);
    b.writeBigUInt64LE(77n, 24);
    b.writeUInt32LE(0o100000, 32);
    expect(parseReadIn(b)).toEqual({ fh: 5n, offset: 2 ** 40, size: 131072, readFlags: 0, lockOwner: 77n, flags: 0o100000 });
    expect(parseReadIn(b.subarray(0, 24)).lockOwner).toBe(0n);
    b.writeBigUInt64LE(1n << 60n, 8);
    expect(() => parseReadIn(b)).toThrow(/out of range/);
  });

  it('getattr_in may be absent (old kernels); release/flush/open decode', () => {
    expect(parseGetattrIn(Buffer.alloc(0))).toEqual({ getattrFlags: 0, fh: 0n });
    const g = Buffer.alloc(16);
    g.writeUInt32LE(1, 0);
    g.writeBigUInt64LE(9n, 8);
    expect(parseGetattrIn(g)).toEqual({ getattrFlags: 1, fh: 9n });
    const o = Buffer.alloc(8);
    o.writeUInt32LE(0o100002, 0);
    expect(parseOpenIn(o)).toEqual({ flags: 0o100002, openFlags: 0 });
    const r = Buffer.alloc(24);
    r.writeBigUInt64LE(3n, 0);
    r.writeUInt32LE(1, 12);
    expect(parseReleaseIn(r)).toEqual({ fh: 3n, flags: 0, releaseFlags: 1, lockOwner: 0n });
    expect(parseFlushIn(r).fh).toBe(3n);
  });

  it('batch forget never reads past the buffer, whatever count claims', () => {
    const b = Buffer.alloc(8 + 2 * 16 + 5);
    b.writeUInt32LE(1_000_000, 0);
    b.writeBigUInt64LE(10n, 8);
    b.writeBigUInt64LE(1n, 16);
    b.writeBigUInt64LE(11n, 24);
    b.writeBigUInt64LE(2n, 32);
    const r = parseBatchForgetIn(b);
    expect(r.truncated).toBe(true);
    expect(r.entries).toEqual([
      { nodeid: 10n, nlookup: 1n },
      { nodeid: 11n, nlookup: 2n },
    ]);
    b.writeUInt32LE(1, 0);
    expect(parseBatchForgetIn(b)).toEqual({ entries: [{ nodeid: 10n, nlookup: 1n }], truncated: false });
  });

  it('getxattr_in: size and name (names may contain /); listxattr has no name', () => {
    const b = Buffer.concat([Buffer.alloc(8), Buffer.from('trusted.overlay.redirect\0')]);
    b.writeUInt32LE(256, 0);
    expect(parseGetxattrIn(b, true)).toEqual({ size: 256, name: 'trusted.overlay.redirect' });
    expect(parseGetxattrIn(b.subarray(0, 8), false)).toEqual({ size: 256 });
    expect(() => parseGetxattrIn(Buffer.concat([Buffer.alloc(8), Buffer.from('user.x')]), true)).toThrow(/NUL/);
  });
});

describe('INIT negotiation', () => {
  const offered = 0x73fffffbn | (0x5fdn << 32n); // what kernel 6.18 offers (observed)

  it('uses the smaller minor and only wanted flags the kernel offers', () => {
    const r = negotiateInit(parseInitIn(initIn(7, 45, offered)), policy);
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(r.size).toBe(INIT_OUT_SIZE);
    expect(r.out.major).toBe(7);
    expect(r.out.minor).toBe(45);
    expect(r.out.flags).toBe(InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.MAX_PAGES | InitFlag.PARALLEL_DIROPS);
    expect(r.out.flags & InitFlag.WRITEBACK_CACHE).toBe(0n);
    expect(r.out.maxPages).toBe(256);
    expect(r.out.maxReadahead).toBe(131072);
    expect(r.out.maxWrite).toBe(128 * 1024);
    expect(r.out.timeGran).toBe(1);

    const newer = negotiateInit(parseInitIn(initIn(7, 99, offered, 4 << 20)), policy);
    expect(newer.ok && newer.out.minor).toBe(45);
    expect(newer.ok && newer.out.maxReadahead).toBe(1 << 20);
  });

  it('drops MAX_PAGES (and max_pages) when not offered; compat reply sizes for old minors', () => {
    const r = negotiateInit(parseInitIn(initIn(7, 22, InitFlag.ASYNC_READ)), policy);
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(r.out.flags).toBe(InitFlag.ASYNC_READ);
    expect(r.out.maxPages).toBe(0);
    expect(r.size).toBe(24);
    expect(encodeInitOut(r.out, r.size).length).toBe(24);
    const r4 = negotiateInit(parseInitIn(initIn(7, 4, 0n)), policy);
    expect(r4.ok && r4.size).toBe(8);
  });

  it('ignores flags2 unless INIT_EXT is offered, and answers high bits only through INIT_EXT', () => {
    const noExt = parseInitIn(initIn(7, 45, InitFlag.ASYNC_READ | InitFlag.PASSTHROUGH));
    expect(noExt.flags & InitFlag.PASSTHROUGH).toBe(0n);
    const want = { ...policy, wantFlags: policy.wantFlags | InitFlag.PASSTHROUGH };
    const r = negotiateInit(parseInitIn(initIn(7, 45, InitFlag.INIT_EXT | InitFlag.PASSTHROUGH)), want);
    expect(r.ok && r.out.flags).toBe(InitFlag.INIT_EXT | InitFlag.PASSTHROUGH);
    if (!r.ok) return;
    const back = parseInitOut(encodeInitOut(r.out));
    expect(back.flags).toBe(InitFlag.INIT_EXT | InitFlag.PASSTHROUGH);
  });

  it('PASSTHROUGH: max_stack_depth 1 (or the clamped policy value) only when negotiated; never with WRITEBACK_CACHE', () => {
    const want = { ...policy, wantFlags: policy.wantFlags | InitFlag.PASSTHROUGH };
    const r = negotiateInit(parseInitIn(initIn(7, 45, offered)), want);
    if (!r.ok) throw new Error('negotiation failed');
    expect(r.out.flags & InitFlag.PASSTHROUGH).toBe(InitFlag.PASSTHROUGH);
    expect(r.out.flags & InitFlag.INIT_EXT).toBe(InitFlag.INIT_EXT);
    expect(r.out.maxStackDepth).toBe(1);
    const b = encodeInitOut(r.out);
    expect(b.readUInt32LE(32)).toBe(1 << 5); // flags2 bit 5 = bit 37
    expect(b.readUInt32LE(36)).toBe(1); // max_stack_depth
    expect(parseInitOut(b)).toEqual(r.out);
    for (const [asked, got] of [[2, 2], [7, 2], [0, 1], [Number.NaN, 1]] as const) {
      const x = negotiateInit(parseInitIn(initIn(7, 45, offered)), { ...want, maxStackDepth: asked });
      expect(x.ok && x.out.maxStackDepth).toBe(got);
    }
    // Not offered (older kernel, or no CONFIG_FUSE_PASSTHROUGH): no flag, depth 0.
    const old = negotiateInit(parseInitIn(initIn(7, 45, offered & ~InitFlag.PASSTHROUGH)), want);
    expect(old.ok && old.out.flags & InitFlag.PASSTHROUGH).toBe(0n);
    expect(old.ok && old.out.maxStackDepth).toBe(0);
    // The kernel ignores PASSTHROUGH next to WRITEBACK_CACHE; so does the negotiation.
    const wb = negotiateInit(parseInitIn(initIn(7, 45, offered)), { ...want, wantFlags: want.wantFlags | InitFlag.WRITEBACK_CACHE });
    expect(wb.ok && wb.out.flags & InitFlag.PASSTHROUGH).toBe(0n);
    expect(wb.ok && wb.out.maxStackDepth).toBe(0);
  });

  it('refuses an older major and answers a newer one with major 7 only', () => {
    const old = negotiateInit(parseInitIn(initIn(6, 1, 0n)), policy);
    expect(old).toMatchObject({ ok: false, errno: Errno.EPROTO });
    const newer = negotiateInit(parseInitIn(initIn(8, 0, 0n)), policy);
    expect(newer.ok && newer.size).toBe(8);
    if (newer.ok) expect(encodeInitOut(newer.out, newer.size).readUInt32LE(0)).toBe(7);
  });

  it('init_out round-trips through its layout', () => {
    const r = negotiateInit(parseInitIn(initIn(7, 45, offered)), policy);
    if (!r.ok) throw new Error('negotiation failed');
    const b = encodeInitOut(r.out);
    expect(b.length).toBe(64);
    expect(b.readUInt16LE(16)).toBe(64); // max_background
    expect(b.readUInt16LE(18)).toBe(48);
    expect(b.readUInt16LE(28)).toBe(256); // max_pages
    expect(parseInitOut(b)).toEqual(r.out);
  });

  it('sizes the device read buffer as the kernel requires', () => {
    expect(readBufferSize(4096)).toBe(8192);
    expect(readBufferSize(128 * 1024)).toBeGreaterThanOrEqual(IN_HEADER_SIZE + 40 + 128 * 1024);
  });
});

describe('replies', () => {
  it('headers: len covers the payload, errors are negative errno with no payload', () => {
    const r = encodeReply(42n, Buffer.from('abc'));
    expect(parseOutHeader(r)).toEqual({ len: 19, error: 0, unique: 42n });
    expect(r.subarray(16).toString()).toBe('abc');
    expect(encodeReply(1n).length).toBe(16);
    const e = encodeError(0xffff_ffff_ffff_fff0n, Errno.ENODATA);
    expect(e.length).toBe(16);
    expect(parseOutHeader(e)).toEqual({ len: 16, error: -61, unique: 0xffff_ffff_ffff_fff0n });
    expect(() => encodeError(1n, 0)).toThrow(FuseProtocolError);
    expect(() => encodeError(1n, -5)).toThrow(FuseProtocolError);
  });

  it('entry_out and attr_out layouts', () => {
    const e = encodeEntryOut({ nodeid: 0x1234n, generation: 0n, entryValidMs: 1500, attrValidMs: 86_400_000, attr: fileAttr });
    expect(e.length).toBe(ENTRY_OUT_SIZE);
    expect(e.readBigUInt64LE(0)).toBe(0x1234n);
    expect(e.readBigUInt64LE(16)).toBe(1n); // entry_valid s
    expect(e.readUInt32LE(32)).toBe(500_000_000); // entry_valid_nsec
    expect(e.readBigUInt64LE(24)).toBe(86_400n);
    const attr = parseAttr(e, 40);
    expect(attr).toMatchObject({ ...fileAttr, blocks: Math.ceil(fileAttr.size / 512), blksize: 4096, rdev: 0, flags: 0 });
    const a = encodeAttrOut(0, fileAttr);
    expect(a.length).toBe(ATTR_OUT_SIZE);
    expect(a.readBigUInt64LE(0)).toBe(0n);
    expect(parseAttr(a, 16).mode).toBe(S_IFREG | 0o444);
  });

  it('splits millisecond timeouts into seconds and nanoseconds', () => {
    expect(splitTimeout(0)).toEqual({ sec: 0n, nsec: 0 });
    expect(splitTimeout(-5)).toEqual({ sec: 0n, nsec: 0 });
    expect(splitTimeout(Number.NaN)).toEqual({ sec: 0n, nsec: 0 });
    expect(splitTimeout(2_250)).toEqual({ sec: 2n, nsec: 250_000_000 });
  });

  it('open_out, getxattr_out and statfs layouts', () => {
    const o = encodeOpenOut(77n, 2);
    expect(o.length).toBe(16);
    expect(o.readBigUInt64LE(0)).toBe(77n);
    expect(o.readUInt32LE(8)).toBe(2);
    expect(o.readInt32LE(12)).toBe(0);
    // fuse_open_out { u64 fh; u32 open_flags; s32 backing_id }, FOPEN_PASSTHROUGH = 1 << 7.
    const pt = encodeOpenOut(5n, (1 << 7) | (1 << 5), 3);
    expect(pt.readUInt32LE(8)).toBe(0xa0);
    expect(pt.readInt32LE(12)).toBe(3);
    expect(encodeGetxattrOut(0).equals(Buffer.alloc(8))).toBe(true);
    const s = encodeStatfsOut({ blocks: 1, bfree: 2, bavail: 3, files: 4, ffree: 5, bsize: 4096, namelen: 255, frsize: 4096 });
    expect(s.length).toBe(80);
    expect(s.readUInt32LE(44)).toBe(255);
  });

  it('dirents: 8-byte aligned records, cookies, size limit and resume', () => {
    const entries = [
      { ino: 1n, name: '.', type: direntType(S_IFDIR) },
      { ino: 1n, name: '..', type: direntType(S_IFDIR) },
      { ino: 2n, name: 'sha256', type: direntType(S_IFDIR) },
      { ino: 0x1000n, name: 'a'.repeat(64), type: direntType(S_IFREG) },
    ];
    expect(direntType(S_IFDIR)).toBe(4);
    expect(direntType(S_IFREG)).toBe(8);
    const all = encodeDirents(entries, 0, 4096);
    expect(all.length % 8).toBe(0);
    expect(all.length).toBe(32 + 32 + 32 + 88);
    const back = parseDirents(all);
    expect(back.map((d) => [d.name, d.off, d.ino, d.type])).toEqual([
      ['.', 1n, 1n, 4],
      ['..', 2n, 1n, 4],
      ['sha256', 3n, 2n, 4],
      ['a'.repeat(64), 4n, 0x1000n, 8],
    ]);
    // Only whole records that fit; resume from the last cookie.
    const first = parseDirents(encodeDirents(entries, 0, 70));
    expect(first.map((d) => d.name)).toEqual(['.', '..']);
    const rest = parseDirents(encodeDirents(entries, Number(first.at(-1)!.off), 4096));
    expect(rest.map((d) => d.name)).toEqual(['sha256', 'a'.repeat(64)]);
    expect(encodeDirents(entries, 4, 4096).length).toBe(0);
    expect(encodeDirents(entries, 99, 4096).length).toBe(0);
    expect(encodeDirents(entries, 0, 10).length).toBe(0);
  });
});

describe('opcode table', () => {
  it('names ops, knows which take no reply and which write', () => {
    expect(opName(Op.LOOKUP)).toBe('LOOKUP');
    expect(opName(Op.BATCH_FORGET)).toBe('BATCH_FORGET');
    expect(opName(12345)).toBe('OP_12345');
    expect(isNoReplyOp(Op.FORGET)).toBe(true);
    expect(isNoReplyOp(Op.BATCH_FORGET)).toBe(true);
    expect(isNoReplyOp(Op.INTERRUPT)).toBe(true);
    expect(isNoReplyOp(Op.GETXATTR)).toBe(false);
    for (const op of [Op.WRITE, Op.SETATTR, Op.CREATE, Op.MKDIR, Op.SETXATTR, Op.REMOVEXATTR, Op.RENAME2]) {
      expect(WRITE_OPS.has(op)).toBe(true);
    }
    for (const op of [Op.GETXATTR, Op.LISTXATTR, Op.READ, Op.FLUSH]) expect(WRITE_OPS.has(op)).toBe(false);
  });
});

describe('hostile input', () => {
  it('random bytes through every decoder raise only FuseProtocolError', () => {
    const decoders: Array<(b: Buffer) => unknown> = [
      (b) => parseRequest(b),
      (b) => parseInitIn(b),
      (b) => parseName(b),
      (b) => parseGetattrIn(b),
      (b) => parseOpenIn(b),
      (b) => parseReadIn(b),
      (b) => parseReleaseIn(b),
      (b) => parseFlushIn(b),
      (b) => parseForgetIn(b),
      (b) => parseBatchForgetIn(b),
      (b) => parseGetxattrIn(b, true),
      (b) => parseGetxattrIn(b, false),
      (b) => parseInterruptIn(b),
      (b) => parseAccessIn(b),
      (b) => parseDirents(b),
      (b) => parseOutHeader(b),
      (b) => parseInitOut(b),
      (b) => parseAttr(b),
    ];
    for (let i = 0; i < 3000; i++) {
      const len = i % 7 === 0 ? i % 200 : Math.floor(Math.random() * 140);
      const b = randomBytes(len);
      // Half the time make the header's len plausible, to reach deeper.
      if (len >= 4 && i % 2 === 0) b.writeUInt32LE(Math.min(len, 40 + (i % 100)), 0);
      for (const d of decoders) {
        try {
          d(b);
        } catch (err) {
          if (!(err instanceof FuseProtocolError)) throw err;
        }
      }
    }
  });

  it('a parsed body never aliases bytes beyond len', () => {
    const b = request(Op.LOOKUP, Buffer.from('abc\0'));
    const big = Buffer.concat([b, Buffer.from('SECRET\0')]);
    const r = parseRequest(big);
    expect(r.body.toString()).toBe('abc\0');
    expect(() => parseName(r.body, 10)).toThrow(FuseProtocolError);
  });
});
