/**
 * Fuzzes the FUSE request decoder (src/core/missfs/protocol.ts): buffers as
 * read from /dev/fuse, through parseRequest and the argument decoder of the
 * opcode, exactly as the server's dispatch picks it. Every case ends in
 * decoded structs that stay inside the buffer, or a FuseProtocolError
 * (InvalidArgument, with an errno to answer); anything else is a crash.
 *
 * Then the same kind of requests, in sequences (INIT, LOOKUP, OPEN, READ,
 * RELEASE, INTERRUPT…), through the real server's request handler
 * (MissFsSession.onRequest) with the replies written to a file instead of
 * /dev/fuse: nothing may escape the handler, every reply must be a
 * well-formed fuse_out_header for a request that was sent, and every request
 * that takes a reply gets exactly one.
 */
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GearError } from '../../src/core/errors.js';
import { silentLogger } from '../../src/core/log.js';
import {
  FuseProtocolError,
  IN_HEADER_SIZE,
  InitFlag,
  Op,
  encodeInitOut,
  isNoReplyOp,
  negotiateInit,
  parseAccessIn,
  parseBatchForgetIn,
  parseFlushIn,
  parseForgetIn,
  parseGetattrIn,
  parseGetxattrIn,
  parseInitIn,
  parseInterruptIn,
  parseName,
  parseOpenIn,
  parseOutHeader,
  parseReadIn,
  parseReleaseIn,
  parseRequest,
  type InitPolicy,
} from '../../src/core/missfs/protocol.js';
import { MissFsSession } from '../../src/core/missfs/server.js';
import type { MissFile, MissProvider } from '../../src/core/missfs/types.js';
import { anyBytes, assertAsync, assertSync, casesRun, count, describe as describeErr, printCounts, requiredCases } from './harness.js';

const DECODER = 'fuse-request';
const DISPATCH = 'fuse-dispatch';

const POLICY: InitPolicy = {
  maxWrite: 128 * 1024,
  maxReadahead: 1 << 20,
  maxPages: 256,
  maxBackground: 64,
  congestionThreshold: 48,
  wantFlags: InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.MAX_PAGES | InitFlag.PARALLEL_DIROPS | InitFlag.PASSTHROUGH,
  maxStackDepth: 1,
};

function expectFuseError(err: unknown, what: string): void {
  if (!(err instanceof FuseProtocolError) || !(err instanceof GearError) || err.class !== 'InvalidArgument') {
    throw new Error(`${what}: crashed with ${describeErr(err)} instead of a FuseProtocolError`, { cause: err });
  }
  if (!Number.isInteger(err.errno) || err.errno <= 0 || err.errno > 4095) throw new Error(`${what}: FuseProtocolError with errno ${err.errno}`);
  if (!err.message) throw new Error(`${what}: FuseProtocolError without a message`);
}

/** parseRequest, then the argument decoder of the opcode as MissFsSession.dispatch picks it; checks bounds on success. */
function decodeLikeDispatch(buf: Buffer): void {
  try {
    const { header: h, body } = parseRequest(buf);
    if (h.len < IN_HEADER_SIZE || h.len > buf.length) throw new Error(`header len ${h.len} accepted for a ${buf.length}-byte read`);
    if (body.length !== h.len - IN_HEADER_SIZE - h.totalExtlen * 8) throw new Error('body length disagrees with len and extlen');
    if (body.byteOffset - buf.byteOffset !== IN_HEADER_SIZE) throw new Error('body does not start after the header');
    switch (h.opcode) {
      case Op.LOOKUP: {
        const name = parseName(body);
        if (name === '' || name.includes('/') || name.includes('\0') || name.length > 1024) throw new Error(`bad name ${JSON.stringify(name)} accepted`);
        break;
      }
      case Op.FORGET:
        parseForgetIn(body);
        break;
      case Op.BATCH_FORGET: {
        const r = parseBatchForgetIn(body);
        if (r.entries.length > Math.floor((body.length - 8) / 16)) throw new Error('BATCH_FORGET decoded entries beyond the body');
        break;
      }
      case Op.GETATTR:
        parseGetattrIn(body);
        break;
      case Op.OPEN:
      case Op.OPENDIR:
        parseOpenIn(body);
        break;
      case Op.READ:
      case Op.READDIR: {
        const r = parseReadIn(body);
        if (!Number.isSafeInteger(r.offset) || r.offset < 0) throw new Error(`read offset ${r.offset} accepted`);
        break;
      }
      case Op.RELEASE:
      case Op.RELEASEDIR:
        parseReleaseIn(body);
        break;
      case Op.FLUSH:
        parseFlushIn(body);
        break;
      case Op.GETXATTR:
        parseGetxattrIn(body, true);
        break;
      case Op.LISTXATTR:
        parseGetxattrIn(body, false);
        break;
      case Op.ACCESS:
        parseAccessIn(body);
        break;
      case Op.INTERRUPT:
        parseInterruptIn(body);
        break;
      case Op.INIT: {
        const r = negotiateInit(parseInitIn(body), POLICY);
        if (r.ok) {
          const out = encodeInitOut(r.out, r.size);
          if (out.length !== Math.max(8, Math.min(r.size, 64))) throw new Error('init_out of the wrong size');
        } else if (!(r.errno > 0)) throw new Error('INIT refused without an errno');
        break;
      }
      default:
        break;
    }
  } catch (err) {
    expectFuseError(err, 'decoder');
  }
}

const OPCODES = Object.values(Op) as number[];
const opcodeArb = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(...OPCODES) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) },
  { weight: 1, arbitrary: fc.constantFrom(0, 7, 19, 54, 4095, 4097, 0x7fffffff, 0xffffffff) },
);
const u64Arb = fc.oneof(
  fc.constantFrom(0n, 1n, 2n, 16n, 0xabn + 16n, 271n, 0x1000n, 0x1001n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);
const u32Arb = fc.oneof(fc.constantFrom(0, 1, 7, 40, 4096, 0x7fffffff, 0xffffffff), fc.integer({ min: 0, max: 0xffffffff }));

/** A NUL-terminated name, or a broken one: empty, unterminated, with '/', over-long, binary. */
const nameArb = fc.oneof(
  fc.constantFrom('sha256', 'ab', '00', 'ff', 'a'.repeat(64), 'x'.repeat(1024), 'x'.repeat(1025), '..', '.', 'a/b', '/').map((s) => Buffer.from(`${s}\0`)),
  fc.constantFrom('', 'sha256', 'x'.repeat(3000)).map((s) => Buffer.from(s)), // unterminated (or empty)
  fc.string({ maxLength: 30 }).map((s) => Buffer.from(`${s}\0`, 'latin1')),
  fc.uint8Array({ maxLength: 40 }).map((b) => Buffer.from(b)),
);

/** The argument struct of an opcode, well-formed or cut at any length, or random bytes. */
function bodyFor(op: number): fc.Arbitrary<Buffer> {
  const struct = (fields: Array<fc.Arbitrary<Buffer>>) => fc.tuple(...fields).map((parts) => Buffer.concat(parts));
  const u64 = u64Arb.map((v) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(v);
    return b;
  });
  const u32 = u32Arb.map((v) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    return b;
  });
  let shaped: fc.Arbitrary<Buffer>;
  switch (op) {
    case Op.LOOKUP:
      shaped = nameArb;
      break;
    case Op.READ:
    case Op.READDIR:
      shaped = struct([u64, u64, u32, u32, u64, u32, u32]);
      break;
    case Op.INIT:
      shaped = struct([fc.constantFrom(6, 7, 8).map((m) => Buffer.from([m, 0, 0, 0])), u32, u32, u32, u32, fc.uint8Array({ maxLength: 48 }).map((b) => Buffer.from(b))]);
      break;
    case Op.BATCH_FORGET:
      shaped = fc.tuple(u32, fc.array(struct([u64, u64]), { maxLength: 6 })).map(([c, es]) => Buffer.concat([c, Buffer.alloc(4), ...es]));
      break;
    case Op.GETXATTR:
      shaped = struct([u32, u32, nameArb]);
      break;
    default:
      shaped = struct([u64, u64, u32, u32, u64]);
  }
  return fc.oneof(
    { weight: 4, arbitrary: shaped },
    { weight: 2, arbitrary: fc.tuple(shaped, fc.nat()).map(([b, n]) => b.subarray(0, n % (b.length + 1))) },
    { weight: 1, arbitrary: fc.uint8Array({ maxLength: 96 }).map((b) => Buffer.from(b)) },
  );
}

interface ReqSpec {
  opcode: number;
  nodeid: bigint;
  pid: number;
  body: Buffer;
  /** How the len field relates to the bytes: exact, or a lie. */
  lenMode: 'exact' | 'short' | 'long' | 'tiny' | 'huge';
  lenDelta: number;
  extlen: number;
  /** Bytes after len (the kernel never sends them; a read buffer might hold them). */
  trailing: Buffer;
}

const reqArb: fc.Arbitrary<ReqSpec> = opcodeArb.chain((opcode) =>
  fc.record({
    opcode: fc.constant(opcode),
    nodeid: u64Arb,
    pid: fc.oneof(fc.constantFrom(0, 1, process.pid, 0x7fffffff), u32Arb),
    body: bodyFor(opcode),
    lenMode: fc.constantFrom('exact', 'exact', 'exact', 'exact', 'short', 'long', 'tiny', 'huge'),
    lenDelta: fc.integer({ min: 1, max: 200 }),
    extlen: fc.oneof({ weight: 6, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
    trailing: fc.oneof({ weight: 5, arbitrary: fc.constant(Buffer.alloc(0)) }, { weight: 1, arbitrary: fc.uint8Array({ minLength: 1, maxLength: 32 }).map((b) => Buffer.from(b)) }),
  }),
);

function encodeRequest(r: ReqSpec, unique: bigint): Buffer {
  const exact = IN_HEADER_SIZE + r.body.length;
  const len =
    r.lenMode === 'exact' ? exact : r.lenMode === 'short' ? Math.max(0, exact - r.lenDelta) : r.lenMode === 'long' ? exact + r.lenDelta : r.lenMode === 'tiny' ? r.lenDelta % IN_HEADER_SIZE : 0xffffffff - r.lenDelta;
  const h = Buffer.alloc(IN_HEADER_SIZE);
  h.writeUInt32LE(len >>> 0, 0);
  h.writeUInt32LE(r.opcode >>> 0, 4);
  h.writeBigUInt64LE(unique, 8);
  h.writeBigUInt64LE(r.nodeid, 16);
  h.writeUInt32LE(0, 24);
  h.writeUInt32LE(0, 28);
  h.writeUInt32LE(r.pid >>> 0, 32);
  h.writeUInt16LE(r.extlen, 36);
  return Buffer.concat([h, r.body, r.trailing]);
}

afterAll(() => {
  printCounts('fuse-request.test.ts');
});

describe('FUSE request decoder', () => {
  it('arbitrary buffers, sometimes with a plausible len field', () => {
    assertSync('fuse: bytes', fc.tuple(anyBytes(200), fc.boolean()), 20_000, ([bytes, fixLen]) => {
      count(DECODER);
      const b = Buffer.from(bytes);
      if (fixLen && b.length >= 4) b.writeUInt32LE(b.length, 0);
      decodeLikeDispatch(b);
    });
  });

  it('well-formed headers with random opcodes, lying lengths, extensions and cut argument structs', () => {
    assertSync('fuse: structured', fc.tuple(reqArb, u64Arb), 30_000, ([r, unique]) => {
      count(DECODER);
      decodeLikeDispatch(encodeRequest(r, unique));
    });
  });

  it('a decoded body never reaches past len, whatever follows in the buffer', () => {
    assertSync('fuse: aliasing', fc.tuple(reqArb.filter((r) => r.lenMode === 'exact' && r.extlen === 0), fc.uint8Array({ minLength: 1, maxLength: 64 })), 5_000, ([r, junk]) => {
      count(DECODER);
      const clean = encodeRequest(r, 1n);
      const withJunk = Buffer.concat([clean, Buffer.from(junk)]);
      const a = parseRequest(clean);
      const b = parseRequest(withJunk);
      expect(b.body.equals(a.body)).toBe(true);
      decodeLikeDispatch(withJunk);
    });
    expect(casesRun(DECODER)).toBeGreaterThanOrEqual(requiredCases(50_000));
  });
});

// ---------------------------------------------------------------------------
// Through the real request handler

/** In-memory blobs: a pure fake of the fetcher side. */
class MemProvider implements MissProvider {
  readonly blobs = new Map<string, Buffer>();
  add(data: Buffer): string {
    const hex = createHash('sha256').update(data).digest('hex');
    this.blobs.set(hex, data);
    return hex;
  }
  async lookup(digest: string): Promise<{ size: number }> {
    const b = this.blobs.get(digest.slice(7));
    if (!b) throw new GearError('NotFound', `unknown ${digest}`);
    return { size: b.length };
  }
  async open(digest: string): Promise<MissFile> {
    const b = this.blobs.get(digest.slice(7));
    if (!b) throw new GearError('NotFound', `unknown ${digest}`);
    return {
      read: async (buf, position) => (position >= b.length ? 0 : b.copy(buf, 0, position, Math.min(b.length, position + buf.length))),
      close: async () => {},
    };
  }
}

interface Session {
  onRequest(buf: Buffer): void;
  inflight: Map<bigint, unknown>;
}

let tmp: string;
let replyPath: string;
let replyFd: number;
const provider = new MemProvider();
const logger = silentLogger();
const blobHex = [provider.add(Buffer.from('hello world\n')), provider.add(Buffer.alloc(70_000, 7)), provider.add(Buffer.alloc(1))];

beforeAll(() => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'gear-fuzz-fuse-'));
  replyPath = path.join(tmp, 'replies');
  replyFd = openSync(replyPath, 'a');
});

afterAll(() => {
  closeSync(replyFd);
  rmSync(tmp, { recursive: true, force: true });
});

function initRequest(minor: number, flags: number): Buffer {
  const body = Buffer.alloc(64);
  body.writeUInt32LE(7, 0);
  body.writeUInt32LE(minor, 4);
  body.writeUInt32LE(1 << 20, 8);
  body.writeUInt32LE(flags >>> 0, 12);
  return encodeRequest({ opcode: Op.INIT, nodeid: 0n, pid: 1, body, lenMode: 'exact', lenDelta: 0, extlen: 0, trailing: Buffer.alloc(0) }, 1n);
}

/** Requests that reach the handler's deeper paths: lookups of real digests, opens and reads of their nodes. */
const deepReqArb: fc.Arbitrary<ReqSpec> = fc.oneof(
  { weight: 3, arbitrary: reqArb },
  {
    weight: 2,
    arbitrary: fc.record({
      opcode: fc.constant(Op.LOOKUP),
      nodeid: fc.constantFrom(1n, 2n, ...blobHex.map((h) => 16n + BigInt(parseInt(h.slice(0, 2), 16))), 16n, 0x1000n),
      pid: fc.constantFrom(0, process.pid, 0x7ffffff0),
      body: fc.constantFrom('sha256', ...blobHex, ...blobHex.map((h) => h.slice(0, 2)), 'f'.repeat(64), 'nope').map((s) => Buffer.from(`${s}\0`)),
      lenMode: fc.constant('exact' as const),
      lenDelta: fc.constant(0),
      extlen: fc.constant(0),
      trailing: fc.constant(Buffer.alloc(0)),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      opcode: fc.constantFrom(Op.OPEN, Op.READ, Op.RELEASE, Op.GETATTR, Op.FORGET, Op.OPENDIR, Op.READDIR, Op.RELEASEDIR, Op.INTERRUPT, Op.ACCESS),
      nodeid: fc.constantFrom(1n, 2n, 0x1000n, 0x1001n, 0x1002n, 0x1003n),
      pid: fc.constantFrom(0, process.pid, 0x7ffffff0),
      body: fc
        .tuple(fc.constantFrom(0n, 1n, 2n, 3n, 4n, 2n ** 62n), fc.constantFrom(0n, 1n, 4096n, 69_999n, 2n ** 53n), fc.constantFrom(0, 1, 4096, 131072, 16 << 20, (16 << 20) + 1, 0xffffffff))
        .map(([fh, off, size]) => {
          const b = Buffer.alloc(40);
          b.writeBigUInt64LE(fh, 0);
          b.writeBigUInt64LE(off, 8);
          b.writeUInt32LE(size, 16);
          return b;
        }),
      lenMode: fc.constant('exact' as const),
      lenDelta: fc.constant(0),
      extlen: fc.constant(0),
      trailing: fc.constant(Buffer.alloc(0)),
    }),
  },
);

const sessionCaseArb = fc.record({
  init: fc.oneof({ weight: 8, arbitrary: fc.record({ minor: fc.integer({ min: 0, max: 60 }), flags: fc.integer({ min: 0, max: 0xffffffff }) }) }, { weight: 1, arbitrary: fc.constant(null) }),
  reqs: fc.array(deepReqArb, { maxLength: 12 }),
});

/** Waits until every tracked request is answered (in-memory provider: a few turns of the loop); bounded in count. */
async function settle(s: Session): Promise<void> {
  for (let i = 0; i < 200 && s.inflight.size > 0; i++) await new Promise((r) => setImmediate(r));
}

describe('FUSE requests through the real request handler', () => {
  it('sequences of hostile requests: no escape, one well-formed reply per request that takes one', async () => {
    await assertAsync('fuse: dispatch', sessionCaseArb, 4_000, async ({ init, reqs }) => {
      count(DISPATCH);
      ftruncateSync(replyFd, 0);
      const session = new MissFsSession(replyFd, path.join(tmp, 'mp'), {
        mountpoint: path.join(tmp, 'mp'),
        provider,
        logger,
        passthrough: false,
        requestTimeoutMs: 4_000,
      }) as unknown as Session;
      const expected = new Map<bigint, number>(); // unique → opcode, for requests that must be answered
      const sent = new Set<bigint>();
      const bufs: Buffer[] = [];
      if (init) bufs.push(initRequest(init.minor, init.flags));
      reqs.forEach((r, i) => bufs.push(encodeRequest(r, BigInt(i + 2))));
      for (const b of bufs) {
        if (b.length >= 16) {
          const unique = b.readBigUInt64LE(8);
          const opcode = b.readUInt32LE(4);
          sent.add(unique);
          if (!isNoReplyOp(opcode)) expected.set(unique, opcode);
        }
        try {
          session.onRequest(b);
        } catch (err) {
          throw new Error(`onRequest let ${describeErr(err)} escape`, { cause: err });
        }
      }
      await settle(session);
      const out = readFileSync(replyPath);
      const answered = new Map<bigint, number>();
      for (let at = 0; at < out.length; ) {
        const h = parseOutHeader(out.subarray(at));
        if (h.len < 16 || at + h.len > out.length) throw new Error(`reply at ${at}: len ${h.len} does not fit`);
        if (h.error > 0 || h.error < -4095) throw new Error(`reply at ${at}: error ${h.error}`);
        if (h.error !== 0 && h.len !== 16) throw new Error(`error reply with a ${h.len - 16}-byte payload`);
        if (!sent.has(h.unique)) throw new Error(`reply to unique ${h.unique}, which was never sent`);
        answered.set(h.unique, (answered.get(h.unique) ?? 0) + 1);
        at += h.len;
      }
      for (const [u, n] of answered) {
        if (n > 1) throw new Error(`unique ${u} answered ${n} times`);
        if (!expected.has(u)) throw new Error(`unique ${u} (a no-reply op) was answered`);
      }
      for (const [u, op] of expected) {
        if (!answered.has(u)) throw new Error(`unique ${u} (opcode ${op}) never answered`);
      }
    });
    expect(casesRun(DISPATCH)).toBeGreaterThanOrEqual(requiredCases(4_000));
  });
});
