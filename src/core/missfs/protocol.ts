/**
 * The Linux FUSE kernel protocol (include/uapi/linux/fuse.h), as far as the
 * miss filesystem speaks it: constants, the opcode table, and pure
 * decoders/encoders of the wire structs. No I/O here.
 *
 * Everything decoded comes from kernel bytes and is checked against the
 * buffer: a length field is never trusted beyond the bytes actually present,
 * and a short or malformed struct raises FuseProtocolError (never a
 * RangeError from a Buffer read).
 *
 * All integers are little-endian; u64 values that identify things (unique,
 * nodeid, fh, lock_owner) are bigints, u64 sizes/offsets that must fit a JS
 * number are converted with a range check.
 */
import { GearError } from '../errors.js';

export const FUSE_KERNEL_VERSION = 7;
/** The highest minor whose struct layouts this module writes (libfuse fuse_kernel.h 7.45). */
export const FUSE_KERNEL_MAX_MINOR = 45;
export const FUSE_ROOT_ID = 1n;
export const FUSE_MIN_READ_BUFFER = 8192;

export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 128;
export const ATTR_OUT_SIZE = 104;
export const OPEN_OUT_SIZE = 16;
export const INIT_OUT_SIZE = 64;
export const STATFS_OUT_SIZE = 80;
export const GETXATTR_OUT_SIZE = 8;
export const DIRENT_HEADER_SIZE = 24;
export const WRITE_IN_SIZE = 40;

/** enum fuse_opcode */
export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  GETLK: 31,
  SETLK: 32,
  SETLKW: 33,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  BMAP: 37,
  DESTROY: 38,
  IOCTL: 39,
  POLL: 40,
  NOTIFY_REPLY: 41,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  READDIRPLUS: 44,
  RENAME2: 45,
  LSEEK: 46,
  COPY_FILE_RANGE: 47,
  SETUPMAPPING: 48,
  REMOVEMAPPING: 49,
  SYNCFS: 50,
  TMPFILE: 51,
  STATX: 52,
  COPY_FILE_RANGE_64: 53,
  CUSE_INIT: 4096,
} as const;
export type OpName = keyof typeof Op;

const OP_NAMES = new Map<number, OpName>(Object.entries(Op).map(([k, v]) => [v, k as OpName]));

/** "LOOKUP", or "OP_<n>" for an opcode this table does not know. */
export function opName(opcode: number): string {
  return OP_NAMES.get(opcode) ?? `OP_${opcode}`;
}

/** Ops that must never be answered (the kernel expects no reply; writing one fails with ENOENT). */
export function isNoReplyOp(opcode: number): boolean {
  return opcode === Op.FORGET || opcode === Op.BATCH_FORGET || opcode === Op.INTERRUPT;
}

/** Ops that would modify the filesystem: a read-only filesystem answers them with EROFS. */
export const WRITE_OPS: ReadonlySet<number> = new Set<number>([
  Op.SETATTR,
  Op.SYMLINK,
  Op.MKNOD,
  Op.MKDIR,
  Op.UNLINK,
  Op.RMDIR,
  Op.RENAME,
  Op.LINK,
  Op.WRITE,
  Op.SETXATTR,
  Op.REMOVEXATTR,
  Op.CREATE,
  Op.FALLOCATE,
  Op.RENAME2,
  Op.COPY_FILE_RANGE,
  Op.TMPFILE,
  Op.COPY_FILE_RANGE_64,
]);

/** Linux errno values used in replies (positive; the wire carries them negated). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  EIO: 5,
  EBADF: 9,
  EAGAIN: 11,
  EACCES: 13,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EROFS: 30,
  ERANGE: 34,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENODATA: 61,
  EPROTO: 71,
  EOPNOTSUPP: 95,
} as const;

/** INIT flag bits (64-bit: bits ≥ 32 travel in flags2 when INIT_EXT is set). */
export const InitFlag = {
  ASYNC_READ: 1n << 0n,
  POSIX_LOCKS: 1n << 1n,
  ATOMIC_O_TRUNC: 1n << 3n,
  EXPORT_SUPPORT: 1n << 4n,
  BIG_WRITES: 1n << 5n,
  DONT_MASK: 1n << 6n,
  SPLICE_WRITE: 1n << 7n,
  SPLICE_MOVE: 1n << 8n,
  SPLICE_READ: 1n << 9n,
  FLOCK_LOCKS: 1n << 10n,
  HAS_IOCTL_DIR: 1n << 11n,
  AUTO_INVAL_DATA: 1n << 12n,
  DO_READDIRPLUS: 1n << 13n,
  READDIRPLUS_AUTO: 1n << 14n,
  ASYNC_DIO: 1n << 15n,
  WRITEBACK_CACHE: 1n << 16n,
  NO_OPEN_SUPPORT: 1n << 17n,
  PARALLEL_DIROPS: 1n << 18n,
  HANDLE_KILLPRIV: 1n << 19n,
  POSIX_ACL: 1n << 20n,
  ABORT_ERROR: 1n << 21n,
  MAX_PAGES: 1n << 22n,
  CACHE_SYMLINKS: 1n << 23n,
  NO_OPENDIR_SUPPORT: 1n << 24n,
  EXPLICIT_INVAL_DATA: 1n << 25n,
  MAP_ALIGNMENT: 1n << 26n,
  SUBMOUNTS: 1n << 27n,
  HANDLE_KILLPRIV_V2: 1n << 28n,
  SETXATTR_EXT: 1n << 29n,
  INIT_EXT: 1n << 30n,
  SECURITY_CTX: 1n << 32n,
  HAS_INODE_DAX: 1n << 33n,
  CREATE_SUPP_GROUP: 1n << 34n,
  HAS_EXPIRE_ONLY: 1n << 35n,
  DIRECT_IO_ALLOW_MMAP: 1n << 36n,
  PASSTHROUGH: 1n << 37n,
  NO_EXPORT_SUPPORT: 1n << 38n,
  HAS_RESEND: 1n << 39n,
  ALLOW_IDMAP: 1n << 40n,
  OVER_IO_URING: 1n << 41n,
  REQUEST_TIMEOUT: 1n << 42n,
} as const;

/** fuse_open_out.open_flags */
export const FOpen = {
  DIRECT_IO: 1 << 0,
  KEEP_CACHE: 1 << 1,
  NONSEEKABLE: 1 << 2,
  CACHE_DIR: 1 << 3,
  STREAM: 1 << 4,
  NOFLUSH: 1 << 5,
  PARALLEL_DIRECT_WRITES: 1 << 6,
  PASSTHROUGH: 1 << 7,
} as const;

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
/** DT_* of a mode, as fuse_dirent.type wants it. */
export function direntType(mode: number): number {
  return (mode & S_IFMT) >>> 12;
}

export const O_ACCMODE = 0o3;
export const R_OK = 4;
export const W_OK = 2;
export const X_OK = 1;

/** A request or reply that does not follow the protocol. */
export class FuseProtocolError extends GearError {
  /** The errno to answer the request with, when it can be answered at all. */
  readonly errno: number;
  constructor(message: string, errno: number = Errno.EINVAL) {
    super('InvalidArgument', message);
    this.name = 'FuseProtocolError';
    this.errno = errno;
  }
}

function need(buf: Buffer, bytes: number, what: string): void {
  if (buf.length < bytes) {
    throw new FuseProtocolError(`${what}: need ${bytes} bytes, have ${buf.length}`);
  }
}

function u64ToNumber(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FuseProtocolError(`${what} ${v} is out of range`);
  return Number(v);
}

// ---------------------------------------------------------------------------
// Requests

export interface InHeader {
  /** The len field as sent (already checked: IN_HEADER_SIZE ≤ len ≤ bytes read). */
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: bigint;
  uid: number;
  gid: number;
  pid: number;
  totalExtlen: number;
}

export interface FuseRequest {
  header: InHeader;
  /** The op arguments: bytes after the header up to len, without trailing extensions. */
  body: Buffer;
}

/** The unique of a request whose header may be damaged, or null when not even that is present. */
export function peekUnique(buf: Buffer): bigint | null {
  return buf.length >= 16 ? buf.readBigUInt64LE(8) : null;
}

/** Decodes one request as read from /dev/fuse (one read = one request). */
export function parseRequest(buf: Buffer): FuseRequest {
  need(buf, IN_HEADER_SIZE, 'fuse_in_header');
  const len = buf.readUInt32LE(0);
  if (len < IN_HEADER_SIZE) throw new FuseProtocolError(`fuse_in_header.len ${len} is below the header size`);
  if (len > buf.length) {
    throw new FuseProtocolError(`fuse_in_header.len ${len} exceeds the ${buf.length} bytes read`);
  }
  const header: InHeader = {
    len,
    opcode: buf.readUInt32LE(4),
    unique: buf.readBigUInt64LE(8),
    nodeid: buf.readBigUInt64LE(16),
    uid: buf.readUInt32LE(24),
    gid: buf.readUInt32LE(28),
    pid: buf.readUInt32LE(32),
    totalExtlen: buf.readUInt16LE(36),
  };
  const extBytes = header.totalExtlen * 8;
  if (IN_HEADER_SIZE + extBytes > len) {
    throw new FuseProtocolError(`extension length ${extBytes} exceeds the request (${len} bytes)`);
  }
  return { header, body: buf.subarray(IN_HEADER_SIZE, len - extBytes) };
}

export interface InitIn {
  major: number;
  minor: number;
  maxReadahead: number;
  /** All offered flags, 64-bit (flags2 folded in when INIT_EXT is offered). */
  flags: bigint;
}

export function parseInitIn(body: Buffer): InitIn {
  // Protocol < 7.6 sent only major/minor; everything newer sends at least 16 bytes.
  need(body, 8, 'fuse_init_in');
  const major = body.readUInt32LE(0);
  const minor = body.readUInt32LE(4);
  let maxReadahead = 0;
  let flags = 0n;
  if (body.length >= 16) {
    maxReadahead = body.readUInt32LE(8);
    flags = BigInt(body.readUInt32LE(12));
    if (body.length >= 20 && (flags & InitFlag.INIT_EXT) !== 0n) {
      flags |= BigInt(body.readUInt32LE(16)) << 32n;
    }
  }
  return { major, minor, maxReadahead, flags };
}

/** A NUL-terminated name (LOOKUP and friends). Rejects a missing NUL, an empty name, or one with '/'. */
export function parseName(body: Buffer, offset = 0): string {
  if (offset > body.length) throw new FuseProtocolError('name: offset beyond the request');
  const nul = body.indexOf(0, offset);
  if (nul < 0) throw new FuseProtocolError('name: missing NUL terminator');
  if (nul === offset) throw new FuseProtocolError('name: empty');
  if (nul - offset > 1024) throw new FuseProtocolError('name: too long', Errno.ENAMETOOLONG);
  const name = body.toString('latin1', offset, nul);
  if (name.includes('/')) throw new FuseProtocolError('name: contains /');
  return name;
}

export interface GetattrIn {
  getattrFlags: number;
  fh: bigint;
}
export const FUSE_GETATTR_FH = 1;

export function parseGetattrIn(body: Buffer): GetattrIn {
  // Before 7.9 GETATTR had no argument.
  if (body.length === 0) return { getattrFlags: 0, fh: 0n };
  need(body, 16, 'fuse_getattr_in');
  return { getattrFlags: body.readUInt32LE(0), fh: body.readBigUInt64LE(8) };
}

export interface OpenIn {
  flags: number;
  openFlags: number;
}

export function parseOpenIn(body: Buffer): OpenIn {
  need(body, 8, 'fuse_open_in');
  return { flags: body.readUInt32LE(0), openFlags: body.readUInt32LE(4) };
}

export interface ReadIn {
  fh: bigint;
  offset: number;
  size: number;
  readFlags: number;
  lockOwner: bigint;
  flags: number;
}

export function parseReadIn(body: Buffer): ReadIn {
  // 24 bytes before 7.9, 40 since.
  need(body, 24, 'fuse_read_in');
  return {
    fh: body.readBigUInt64LE(0),
    offset: u64ToNumber(body.readBigUInt64LE(8), 'fuse_read_in.offset'),
    size: body.readUInt32LE(16),
    readFlags: body.readUInt32LE(20),
    lockOwner: body.length >= 32 ? body.readBigUInt64LE(24) : 0n,
    flags: body.length >= 36 ? body.readUInt32LE(32) : 0,
  };
}

export interface ReleaseIn {
  fh: bigint;
  flags: number;
  releaseFlags: number;
  lockOwner: bigint;
}

export function parseReleaseIn(body: Buffer): ReleaseIn {
  need(body, 16, 'fuse_release_in');
  return {
    fh: body.readBigUInt64LE(0),
    flags: body.readUInt32LE(8),
    releaseFlags: body.readUInt32LE(12),
    lockOwner: body.length >= 24 ? body.readBigUInt64LE(16) : 0n,
  };
}

export interface FlushIn {
  fh: bigint;
  lockOwner: bigint;
}

export function parseFlushIn(body: Buffer): FlushIn {
  need(body, 8, 'fuse_flush_in');
  return { fh: body.readBigUInt64LE(0), lockOwner: body.length >= 24 ? body.readBigUInt64LE(16) : 0n };
}

export function parseForgetIn(body: Buffer): { nlookup: bigint } {
  need(body, 8, 'fuse_forget_in');
  return { nlookup: body.readBigUInt64LE(0) };
}

export interface ForgetOne {
  nodeid: bigint;
  nlookup: bigint;
}

/**
 * BATCH_FORGET: the count is clamped to the entries actually present
 * (`truncated` tells the caller the kernel claimed more than it sent).
 */
export function parseBatchForgetIn(body: Buffer): { entries: ForgetOne[]; truncated: boolean } {
  need(body, 8, 'fuse_batch_forget_in');
  const count = body.readUInt32LE(0);
  const present = Math.floor((body.length - 8) / 16);
  const n = Math.min(count, present);
  const entries: ForgetOne[] = [];
  for (let i = 0; i < n; i++) {
    const at = 8 + i * 16;
    entries.push({ nodeid: body.readBigUInt64LE(at), nlookup: body.readBigUInt64LE(at + 8) });
  }
  return { entries, truncated: count > present };
}

export interface GetxattrIn {
  size: number;
  /** Present for GETXATTR, absent for LISTXATTR. */
  name?: string;
}

export function parseGetxattrIn(body: Buffer, withName: boolean): GetxattrIn {
  need(body, 8, 'fuse_getxattr_in');
  const size = body.readUInt32LE(0);
  if (!withName) return { size };
  // Names of xattrs may contain '/' ("trusted.foo/bar" is legal), so no parseName here.
  const nul = body.indexOf(0, 8);
  if (nul < 0) throw new FuseProtocolError('xattr name: missing NUL terminator');
  return { size, name: body.toString('latin1', 8, nul) };
}

export function parseInterruptIn(body: Buffer): { unique: bigint } {
  need(body, 8, 'fuse_interrupt_in');
  return { unique: body.readBigUInt64LE(0) };
}

export function parseAccessIn(body: Buffer): { mask: number } {
  need(body, 4, 'fuse_access_in');
  return { mask: body.readUInt32LE(0) };
}

// ---------------------------------------------------------------------------
// Replies

/** A complete reply: header + payload in one buffer (one write). */
export function encodeReply(unique: bigint, payload?: Buffer): Buffer {
  const len = OUT_HEADER_SIZE + (payload?.length ?? 0);
  const out = Buffer.allocUnsafe(len);
  writeOutHeader(out, len, 0, unique);
  if (payload) payload.copy(out, OUT_HEADER_SIZE);
  return out;
}

/** An error reply: the 16-byte header with error = -errno. */
export function encodeError(unique: bigint, errno: number): Buffer {
  if (!Number.isInteger(errno) || errno <= 0 || errno > 4095) {
    throw new FuseProtocolError(`invalid errno ${errno} for a reply`);
  }
  const out = Buffer.allocUnsafe(OUT_HEADER_SIZE);
  writeOutHeader(out, OUT_HEADER_SIZE, -errno, unique);
  return out;
}

/** fuse_notify_code: unsolicited messages the server writes with unique 0 (the code in the error field). */
export const NotifyCode = {
  INVAL_INODE: 2,
} as const;

/**
 * FUSE_NOTIFY_INVAL_INODE for the whole of nodeid: the kernel drops the
 * pages it cached for the inode (and its attributes). It waits for pages that
 * are locked by a READ in flight, so it must never be written by the thread
 * that answers those READs.
 */
export function encodeNotifyInvalInode(nodeid: bigint): Buffer {
  const out = Buffer.alloc(OUT_HEADER_SIZE + 24);
  writeOutHeader(out, out.length, NotifyCode.INVAL_INODE, 0n);
  out.writeBigUInt64LE(nodeid, 16);
  out.writeBigInt64LE(0n, 24); // offset 0 …
  out.writeBigInt64LE(0n, 32); // … length 0: to the end
  return out;
}

/**
 * Writes fuse_out_header at the start of buf, for a reply whose payload was
 * written in place at buf[16..]; `len` is the total reply length.
 */
export function writeOutHeader(buf: Buffer, len: number, error: number, unique: bigint): void {
  buf.writeUInt32LE(len, 0);
  buf.writeInt32LE(error, 4);
  buf.writeBigUInt64LE(unique, 8);
}

export interface OutHeader {
  len: number;
  error: number;
  unique: bigint;
}

/** Decodes a reply header (tests and diagnostics). */
export function parseOutHeader(buf: Buffer): OutHeader {
  need(buf, OUT_HEADER_SIZE, 'fuse_out_header');
  return { len: buf.readUInt32LE(0), error: buf.readInt32LE(4), unique: buf.readBigUInt64LE(8) };
}

export interface Attr {
  ino: bigint;
  size: number;
  /** 512-byte units; default ceil(size / 512). */
  blocks?: number;
  /** Seconds since the epoch (integer part) for atime/mtime/ctime. */
  atime: number;
  mtime: number;
  ctime: number;
  atimeNsec?: number;
  mtimeNsec?: number;
  ctimeNsec?: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev?: number;
  blksize?: number;
  flags?: number;
}

function writeU64(buf: Buffer, v: number | bigint, at: number): void {
  buf.writeBigUInt64LE(typeof v === 'bigint' ? v : BigInt(Math.max(0, Math.trunc(v))), at);
}

export function writeAttr(buf: Buffer, at: number, a: Attr): void {
  writeU64(buf, a.ino, at);
  writeU64(buf, a.size, at + 8);
  writeU64(buf, a.blocks ?? Math.ceil(a.size / 512), at + 16);
  writeU64(buf, a.atime, at + 24);
  writeU64(buf, a.mtime, at + 32);
  writeU64(buf, a.ctime, at + 40);
  buf.writeUInt32LE(a.atimeNsec ?? 0, at + 48);
  buf.writeUInt32LE(a.mtimeNsec ?? 0, at + 52);
  buf.writeUInt32LE(a.ctimeNsec ?? 0, at + 56);
  buf.writeUInt32LE(a.mode >>> 0, at + 60);
  buf.writeUInt32LE(a.nlink >>> 0, at + 64);
  buf.writeUInt32LE(a.uid >>> 0, at + 68);
  buf.writeUInt32LE(a.gid >>> 0, at + 72);
  buf.writeUInt32LE((a.rdev ?? 0) >>> 0, at + 76);
  buf.writeUInt32LE((a.blksize ?? 4096) >>> 0, at + 80);
  buf.writeUInt32LE((a.flags ?? 0) >>> 0, at + 84);
}

export function parseAttr(buf: Buffer, at = 0): Attr {
  need(buf, at + ATTR_SIZE, 'fuse_attr');
  return {
    ino: buf.readBigUInt64LE(at),
    size: u64ToNumber(buf.readBigUInt64LE(at + 8), 'fuse_attr.size'),
    blocks: u64ToNumber(buf.readBigUInt64LE(at + 16), 'fuse_attr.blocks'),
    atime: u64ToNumber(buf.readBigUInt64LE(at + 24), 'fuse_attr.atime'),
    mtime: u64ToNumber(buf.readBigUInt64LE(at + 32), 'fuse_attr.mtime'),
    ctime: u64ToNumber(buf.readBigUInt64LE(at + 40), 'fuse_attr.ctime'),
    atimeNsec: buf.readUInt32LE(at + 48),
    mtimeNsec: buf.readUInt32LE(at + 52),
    ctimeNsec: buf.readUInt32LE(at + 56),
    mode: buf.readUInt32LE(at + 60),
    nlink: buf.readUInt32LE(at + 64),
    uid: buf.readUInt32LE(at + 68),
    gid: buf.readUInt32LE(at + 72),
    rdev: buf.readUInt32LE(at + 76),
    blksize: buf.readUInt32LE(at + 80),
    flags: buf.readUInt32LE(at + 84),
  };
}

/** A cache validity in milliseconds, as the (seconds u64, nsec u32) pair FUSE wants. */
export function splitTimeout(ms: number): { sec: bigint; nsec: number } {
  const clamped = Number.isFinite(ms) && ms > 0 ? ms : 0;
  const sec = Math.floor(clamped / 1000);
  const nsec = Math.round((clamped - sec * 1000) * 1e6);
  return nsec >= 1e9 ? { sec: BigInt(sec + 1), nsec: 0 } : { sec: BigInt(sec), nsec };
}

export interface EntryOut {
  /** 0 with entryValidMs > 0 is a cached negative entry. */
  nodeid: bigint;
  generation: bigint;
  entryValidMs: number;
  attrValidMs: number;
  attr: Attr;
}

export function encodeEntryOut(e: EntryOut): Buffer {
  const out = Buffer.alloc(ENTRY_OUT_SIZE);
  out.writeBigUInt64LE(e.nodeid, 0);
  out.writeBigUInt64LE(e.generation, 8);
  const ev = splitTimeout(e.entryValidMs);
  const av = splitTimeout(e.attrValidMs);
  out.writeBigUInt64LE(ev.sec, 16);
  out.writeBigUInt64LE(av.sec, 24);
  out.writeUInt32LE(ev.nsec, 32);
  out.writeUInt32LE(av.nsec, 36);
  writeAttr(out, 40, e.attr);
  return out;
}

export function encodeAttrOut(attrValidMs: number, attr: Attr): Buffer {
  const out = Buffer.alloc(ATTR_OUT_SIZE);
  const av = splitTimeout(attrValidMs);
  out.writeBigUInt64LE(av.sec, 0);
  out.writeUInt32LE(av.nsec, 8);
  writeAttr(out, 16, attr);
  return out;
}

export function encodeOpenOut(fh: bigint, openFlags: number, backingId = 0): Buffer {
  const out = Buffer.alloc(OPEN_OUT_SIZE);
  out.writeBigUInt64LE(fh, 0);
  out.writeUInt32LE(openFlags >>> 0, 8);
  out.writeInt32LE(backingId, 12);
  return out;
}

export function encodeGetxattrOut(size: number): Buffer {
  const out = Buffer.alloc(GETXATTR_OUT_SIZE);
  out.writeUInt32LE(size >>> 0, 0);
  return out;
}

export interface StatfsOut {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

export function encodeStatfsOut(s: StatfsOut): Buffer {
  const out = Buffer.alloc(STATFS_OUT_SIZE);
  writeU64(out, s.blocks, 0);
  writeU64(out, s.bfree, 8);
  writeU64(out, s.bavail, 16);
  writeU64(out, s.files, 24);
  writeU64(out, s.ffree, 32);
  out.writeUInt32LE(s.bsize >>> 0, 40);
  out.writeUInt32LE(s.namelen >>> 0, 44);
  out.writeUInt32LE(s.frsize >>> 0, 48);
  return out;
}

export interface Dirent {
  ino: bigint;
  name: string;
  /** DT_* value (direntType(mode)). */
  type: number;
}

function direntSize(nameLen: number): number {
  return (DIRENT_HEADER_SIZE + nameLen + 7) & ~7;
}

/**
 * READDIR payload: entries from index `offset` (the cookie of the previous
 * reply's last entry) that fit in `maxSize` bytes. Entry i carries cookie i+1.
 * An empty buffer means the end of the directory.
 */
export function encodeDirents(entries: readonly Dirent[], offset: number, maxSize: number): Buffer {
  const parts: Buffer[] = [];
  let used = 0;
  for (let i = Math.max(0, offset); i < entries.length; i++) {
    const e = entries[i]!;
    const name = Buffer.from(e.name, 'latin1');
    const size = direntSize(name.length);
    if (used + size > maxSize) break;
    const d = Buffer.alloc(size);
    d.writeBigUInt64LE(e.ino, 0);
    d.writeBigUInt64LE(BigInt(i + 1), 8);
    d.writeUInt32LE(name.length, 16);
    d.writeUInt32LE(e.type, 20);
    name.copy(d, DIRENT_HEADER_SIZE);
    parts.push(d);
    used += size;
  }
  return Buffer.concat(parts, used);
}

/** Decodes a READDIR payload (tests and diagnostics); stops at the first damaged record. */
export function parseDirents(buf: Buffer): Array<Dirent & { off: bigint }> {
  const out: Array<Dirent & { off: bigint }> = [];
  let at = 0;
  while (at + DIRENT_HEADER_SIZE <= buf.length) {
    const nameLen = buf.readUInt32LE(at + 16);
    if (at + DIRENT_HEADER_SIZE + nameLen > buf.length) break;
    out.push({
      ino: buf.readBigUInt64LE(at),
      off: buf.readBigUInt64LE(at + 8),
      type: buf.readUInt32LE(at + 20),
      name: buf.toString('latin1', at + DIRENT_HEADER_SIZE, at + DIRENT_HEADER_SIZE + nameLen),
    });
    at += direntSize(nameLen);
  }
  return out;
}

// ---------------------------------------------------------------------------
// INIT negotiation

export interface InitPolicy {
  /** Largest WRITE the kernel may send (≥ 4096). Sizes the read buffer: see readBufferSize(). */
  maxWrite: number;
  /** Upper bound for max_readahead; the kernel's offer is never exceeded. */
  maxReadahead: number;
  /** Pages per request when MAX_PAGES is offered (kernel cap: fs.fuse.max_pages_limit, default 256). */
  maxPages: number;
  /** 0 keeps the kernel default (12). */
  maxBackground: number;
  /** 0 keeps the kernel default (9). */
  congestionThreshold: number;
  /** Flags wanted; only those the kernel offers are accepted. */
  wantFlags: bigint;
  /**
   * init_out.max_stack_depth when PASSTHROUGH is negotiated (1 or 2; default
   * 1). It becomes the FUSE superblock's stack depth: with 1 the mount can be
   * an overlayfs lower layer and backing files must live on a non-stacked
   * filesystem (ext4, xfs…); with 2 backing files may be on overlayfs but the
   * mount can no longer be stacked under overlayfs.
   */
  maxStackDepth?: number;
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: bigint;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
  /** Non-zero only with PASSTHROUGH (FILESYSTEM_MAX_STACK_DEPTH is 2). */
  maxStackDepth: number;
}

/** The kernel's FILESYSTEM_MAX_STACK_DEPTH. */
export const FILESYSTEM_MAX_STACK_DEPTH = 2;

export type InitResult =
  | { ok: true; out: InitOut; /** Bytes of fuse_init_out for the negotiated minor. */ size: number }
  | { ok: false; errno: number; reason: string };

/** Negotiates INIT: major 7, the smaller minor, and the wanted flags the kernel offers. */
export function negotiateInit(req: InitIn, policy: InitPolicy): InitResult {
  if (req.major < FUSE_KERNEL_VERSION) {
    return { ok: false, errno: Errno.EPROTO, reason: `kernel FUSE protocol ${req.major}.${req.minor} is too old` };
  }
  if (req.major > FUSE_KERNEL_VERSION) {
    // Answer with our major only; a newer kernel then either re-sends INIT for 7.x or gives up.
    return {
      ok: true,
      size: 8,
      out: {
        major: FUSE_KERNEL_VERSION,
        minor: FUSE_KERNEL_MAX_MINOR,
        maxReadahead: 0,
        flags: 0n,
        maxBackground: 0,
        congestionThreshold: 0,
        maxWrite: 0,
        timeGran: 0,
        maxPages: 0,
        maxStackDepth: 0,
      },
    };
  }
  const minor = Math.min(req.minor, FUSE_KERNEL_MAX_MINOR);
  let flags = policy.wantFlags & req.flags;
  // The kernel silently ignores PASSTHROUGH together with WRITEBACK_CACHE; say what is really in effect.
  if ((flags & InitFlag.WRITEBACK_CACHE) !== 0n) flags &= ~InitFlag.PASSTHROUGH;
  // Bits above 31 can only be answered through flags2, which needs INIT_EXT.
  if ((flags >> 32n) !== 0n) {
    if ((req.flags & InitFlag.INIT_EXT) !== 0n) flags |= InitFlag.INIT_EXT;
    else flags &= 0xffffffffn;
  }
  const maxPages = (flags & InitFlag.MAX_PAGES) !== 0n ? Math.max(1, Math.min(policy.maxPages, 65535)) : 0;
  // The kernel enables passthrough only with 0 < max_stack_depth <= FILESYSTEM_MAX_STACK_DEPTH.
  const maxStackDepth =
    (flags & InitFlag.PASSTHROUGH) !== 0n
      ? Math.max(1, Math.min(Math.trunc(Number.isFinite(policy.maxStackDepth) ? policy.maxStackDepth! : 1), FILESYSTEM_MAX_STACK_DEPTH))
      : 0;
  const size = minor < 5 ? 8 : minor < 23 ? 24 : INIT_OUT_SIZE;
  return {
    ok: true,
    size,
    out: {
      major: FUSE_KERNEL_VERSION,
      minor,
      maxReadahead: Math.min(req.maxReadahead, policy.maxReadahead),
      flags,
      maxBackground: policy.maxBackground,
      congestionThreshold: policy.congestionThreshold,
      maxWrite: Math.max(4096, policy.maxWrite),
      timeGran: 1,
      maxPages,
      maxStackDepth,
    },
  };
}

export function encodeInitOut(o: InitOut, size: number = INIT_OUT_SIZE): Buffer {
  const out = Buffer.alloc(INIT_OUT_SIZE);
  out.writeUInt32LE(o.major, 0);
  out.writeUInt32LE(o.minor, 4);
  out.writeUInt32LE(o.maxReadahead >>> 0, 8);
  out.writeUInt32LE(Number(o.flags & 0xffffffffn), 12);
  out.writeUInt16LE(o.maxBackground & 0xffff, 16);
  out.writeUInt16LE(o.congestionThreshold & 0xffff, 18);
  out.writeUInt32LE(o.maxWrite >>> 0, 20);
  out.writeUInt32LE(o.timeGran >>> 0, 24);
  out.writeUInt16LE(o.maxPages & 0xffff, 28);
  out.writeUInt16LE(0, 30); // map_alignment
  out.writeUInt32LE(Number((o.flags >> 32n) & 0xffffffffn), 32);
  out.writeUInt32LE(o.maxStackDepth >>> 0, 36); // 0 unless PASSTHROUGH
  out.writeUInt16LE(0, 40); // request_timeout
  return out.subarray(0, Math.max(8, Math.min(size, INIT_OUT_SIZE)));
}

export function parseInitOut(buf: Buffer): InitOut {
  need(buf, 24, 'fuse_init_out');
  const full = buf.length >= INIT_OUT_SIZE;
  return {
    major: buf.readUInt32LE(0),
    minor: buf.readUInt32LE(4),
    maxReadahead: buf.readUInt32LE(8),
    flags: BigInt(buf.readUInt32LE(12)) | (full ? BigInt(buf.readUInt32LE(32)) << 32n : 0n),
    maxBackground: buf.readUInt16LE(16),
    congestionThreshold: buf.readUInt16LE(18),
    maxWrite: buf.readUInt32LE(20),
    timeGran: full ? buf.readUInt32LE(24) : 0,
    maxPages: full ? buf.readUInt16LE(28) : 0,
    maxStackDepth: full ? buf.readUInt32LE(36) : 0,
  };
}

/** The /dev/fuse read buffer for a given max_write (the kernel rejects smaller reads with EINVAL). */
export function readBufferSize(maxWrite: number): number {
  return Math.max(FUSE_MIN_READ_BUFFER, IN_HEADER_SIZE + WRITE_IN_SIZE + maxWrite, maxWrite + 4096);
}
