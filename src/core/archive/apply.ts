/**
 * Layer tar extraction (graph-driver ApplyDiff, snapshotter apply): turns an
 * OCI/Docker layer tar into an overlay layer directory, the way Docker's
 * overlay2 driver does, treating every byte of the tar as hostile.
 *
 * Safety model:
 *  - dest is a fresh, empty directory that only this call writes to (the
 *    layer store guarantees it: root-only 0700 parents). Node has no openat,
 *    so paths are checked and then used; that is sound only because nothing
 *    else writes under dest meanwhile.
 *  - No symlink is ever followed. Before each entry every parent component is
 *    lstat()ed and must be a real directory (missing ones are created 0755);
 *    a symlink an earlier entry planted as a parent refuses the layer. The
 *    final component is replaced by unlink-then-create (O_EXCL|O_NOFOLLOW),
 *    metadata uses lchown/lutimes/lsetxattr or fd calls, and chmod is skipped for symlink inodes.
 *  - Any refused entry, parse error or I/O error empties dest (and restores
 *    its own metadata) before applyLayer rejects; the input is destroyed (or,
 *    with drainInputOnError, drained) and the extractor destroyed, so no pipe
 *    is left half-open.
 *
 * Whiteouts: `.wh.NAME` becomes a 0/0 char device NAME; `.wh..wh..opq` sets
 * trusted.overlay.opaque=y on its directory; other `.wh..wh.*` (AUFS
 * metadata) are skipped. trusted.overlay.* and user.overlay.* xattrs from the
 * tar are dropped: overlayfs would obey them (redirects, metacopy).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import type tarStream from 'tar-stream';
import { errnoCode, failedPrecondition, GearError, internal, invalidArgument, unavailable } from '../errors.js';
import { native } from '../sys/native.js';
import { deviceProblem, ownerProblem, xattrProblem } from '../sys/limits.js';
import { getXattr, listXattrs, removeXattr, setXattr } from '../sys/xattr.js';
import { classifyWhiteout, entryComponents, quoteName, refuse } from './tarpath.js';
import { feedExtract, hardenedExtract, type PaxRecords } from './tarreader.js';

export interface ApplyLimits {
  /** Bytes of one PAX or GNU long-name header (tar-stream caps this at 4 MiB regardless). */
  maxHeaderBytes: number;
  /** Bytes of a normalised entry path, and of a symlink target. */
  maxPathLength: number;
  /** Components of an entry path. */
  maxDepth: number;
  /** Tar entries, of any type. */
  maxEntries: number;
  /** Bytes of the (decompressed) tar stream: a backstop against decompression bombs. */
  maxBytes: number;
}

export const DEFAULT_APPLY_LIMITS: Readonly<ApplyLimits> = Object.freeze({
  maxHeaderBytes: 1024 * 1024,
  maxPathLength: 4096,
  maxDepth: 256,
  maxEntries: 10_000_000,
  maxBytes: 1024 ** 4,
});

export interface ApplyOptions {
  limits?: Partial<ApplyLimits>;
  /** Aborting stops the extraction; applyLayer then cleans dest and rejects. */
  signal?: AbortSignal;
  /**
   * On failure, read the rest of the input and discard it instead of
   * destroying it (an HTTP request body must be drained for the reply to go
   * out). The default destroys it.
   */
  drainInputOnError?: boolean;
}

export interface ApplyResult {
  /** Sum of regular-file sizes, as Docker's overlay2 ApplyDiff reports. */
  size: number;
  /** Tar entries read (every type, whiteouts and skipped ones included). */
  entries: number;
}

const OVERLAY_OPAQUE = 'trusted.overlay.opaque';
const XATTR_PAX_PREFIX = 'SCHILY.xattr.';
/** Docker's boundTime: times outside [epoch, max int64 ns] become the epoch. */
const MAX_TIME_S = 9223372036;
const SPARSE_BLOCK = 4096;
const ZERO_BLOCK = Buffer.alloc(SPARSE_BLOCK);
const FILE_FLAGS = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW;
const { S_IFCHR, S_IFBLK, S_IFIFO } = fs.constants;

/** tar-stream's header as it really arrives: type is null for unknown typeflags ('S', 'D', 'V'…). */
type Header = Omit<tarStream.Header, 'type'> & { type: tarStream.Header['type'] | null };
type Entry = AsyncIterable<unknown>;

/**
 * Extracts a layer tar (plain, gzip or zstd, detected by magic bytes) into
 * dest, an empty directory that becomes an overlay upper/lower layer dir.
 *
 * Throws GearError: InvalidArgument for anything wrong with the layer
 * (refused entry, corrupt or truncated tar or compression, limits);
 * FailedPrecondition when dest is not an empty directory; Unavailable when
 * the input stream fails or the signal aborts; Internal for local I/O errors.
 * On every failure dest is left empty.
 */
export async function applyLayer(tar: Readable, dest: string, opts: ApplyOptions = {}): Promise<ApplyResult> {
  const limits: ApplyLimits = { ...DEFAULT_APPLY_LIMITS, ...opts.limits };
  const root = prepareDest(dest);
  const hx = hardenedExtract(limits.maxHeaderBytes);
  const extract = hx.extract;
  const state = new Extraction(root.path, limits, hx.takePax);

  const onAbort = (): void => {
    extract.destroy(new GearError('Unavailable', 'layer extraction aborted', { cause: opts.signal?.reason }));
  };
  opts.signal?.addEventListener('abort', onAbort, { once: true });
  let feedError: unknown;
  const feeding = feedExtract(tar, extract, limits.maxBytes).then(
    () => undefined,
    (err: unknown) => {
      feedError = err;
      extract.destroy(err as Error);
    },
  );
  try {
    if (opts.signal?.aborted) onAbort();
    try {
      for await (const entry of extract) {
        if (hx.zeroBlocks() > 0) throw invalidArgument('layer tar has data after its end-of-archive marker');
        await state.apply(entry.header, entry);
      }
    } catch (err) {
      // The extractor may have been destroyed by the feeder: prefer its error.
      throw classify(feedError ?? err);
    }
    await feeding;
    if (feedError) throw classify(feedError);
    state.finish();
    return { size: state.size, entries: state.entries };
  } catch (err) {
    extract.destroy();
    if (opts.drainInputOnError) {
      // The feeder stops at its next chunk and lets go of the input; only
      // then can the input flow into the void.
      void feeding.then(() =>
        setImmediate(() => {
          tar.on('error', () => {});
          tar.resume();
        }),
      );
    } else {
      tar.destroy();
      await feeding;
    }
    try {
      root.restore();
    } catch (cleanupErr) {
      throw internal(`${(err as Error).message}; then emptying ${dest} failed: ${(cleanupErr as Error).message}`, cleanupErr);
    }
    throw err;
  } finally {
    opts.signal?.removeEventListener('abort', onAbort);
  }
}


/** Errors from tar-stream (plain Errors) become InvalidArgument: the tar is bad. */
function classify(err: unknown): GearError {
  if (err instanceof GearError) return err;
  return invalidArgument(`layer tar is corrupt: ${(err as Error)?.message ?? String(err)}`, err);
}

interface PreparedDest {
  path: string;
  /** Empties the directory and puts back its own mode, owner, times and xattrs. */
  restore(): void;
}

function prepareDest(dest: string): PreparedDest {
  let real: string;
  let st: fs.Stats;
  try {
    real = fs.realpathSync(dest);
    st = fs.lstatSync(real);
  } catch (err) {
    throw failedPrecondition(`layer directory ${dest}: ${(err as Error).message}`, err);
  }
  if (!st.isDirectory()) throw failedPrecondition(`layer directory ${dest} is not a directory`);
  if (fs.readdirSync(real).length > 0) throw failedPrecondition(`layer directory ${dest} is not empty`);
  const xattrs = new Map(listXattrs(real).map((n) => [n, getXattr(real, n)] as const));
  return {
    path: real,
    restore() {
      for (const name of fs.readdirSync(real)) fs.rmSync(path.join(real, name), { recursive: true, force: true });
      for (const name of listXattrs(real)) {
        const orig = xattrs.get(name);
        if (orig === undefined) removeXattr(real, name);
        else if (orig !== null && !orig.equals(getXattr(real, name) ?? Buffer.alloc(0))) setXattr(real, name, orig);
      }
      fs.lchownSync(real, st.uid, st.gid);
      fs.chmodSync(real, st.mode & 0o7777);
      fs.lutimesSync(real, st.atime, st.mtime);
    },
  };
}

/** Numeric metadata of one entry, validated. */
interface Meta {
  mode: number;
  uid: number;
  gid: number;
  atime: number;
  mtime: number;
  xattrs: [string, Buffer][];
}

class Extraction {
  size = 0;
  entries = 0;
  /** Directory times, applied last (children change a directory's mtime). */
  private readonly dirTimes = new Map<string, { atime: number; mtime: number }>();

  constructor(
    private readonly root: string,
    private readonly limits: ApplyLimits,
    private readonly takePax: () => PaxRecords | null,
  ) {}

  async apply(h: Header, data: Entry): Promise<void> {
    const pax = this.takePax() ?? new Map<string, Buffer>();
    const name = h.name;
    if (++this.entries > this.limits.maxEntries) {
      throw invalidArgument(`layer tar has more than ${this.limits.maxEntries} entries`);
    }
    const type = h.type;
    if (!type || ['pax-header', 'pax-global-header', 'gnu-long-path', 'gnu-long-link-path'].includes(type)) {
      throw refuse(name, 'unsupported entry type (GNU sparse, multi-volume or vendor extension)');
    }
    // tar-stream decodes a base-256 field it cannot read (first byte 0x81–0xfe) as null, which it then
    // takes for a size of 0 bytes whose data never ends (a hang); Go refuses such fields.
    for (const [what, v] of [['size', h.size], ['mode', h.mode], ['uid', h.uid], ['gid', h.gid]] as const) {
      if ((v as unknown) === null) throw refuse(name, `the ${what} field is not a valid number`);
    }
    const size = h.size ?? 0;
    // -0: tar-stream's base-256 decoder turns -1 (all 0xff) into -0, which Go refuses.
    if (Object.is(size, -0) || size < 0) throw refuse(name, `size is negative (${Object.is(size, -0) ? 'a base-256 size field of -1' : size}); a size is a whole number ≥ 0`);
    if (!Number.isSafeInteger(size)) throw refuse(name, `size ${size} is not a whole number in 0…2^53−1`);
    const isFile = type === 'file' || type === 'contiguous-file';
    // Go treats links, devices, fifos and dirs as header-only; tar-stream would
    // read their "data" as content. Refuse the ambiguity.
    if (!isFile && size !== 0) throw refuse(name, `a ${type} entry must not carry data (size ${size})`);
    for (const key of pax.keys()) {
      if (key.startsWith('GNU.sparse.')) throw refuse(name, 'GNU sparse files are not supported');
    }
    const parts = entryComponents(name, this.limits);
    const meta = this.meta(h, pax);

    const wh = classifyWhiteout(name, parts);
    if (wh.kind === 'skip') return drain(data);
    if (wh.kind === 'opaque') {
      const dir = this.parentDir(name, parts);
      this.sys(name, () => setXattr(dir, OVERLAY_OPAQUE, 'y'));
      return drain(data);
    }
    if (wh.kind === 'whiteout') {
      const target = path.join(this.parentDir(name, parts), wh.target);
      if (lstatOrNull(target)) throw refuse(name, `whiteout for ${quoteName(wh.target)}, which this layer also creates`);
      this.sys(name, () => {
        native.mknod(target, S_IFCHR, 0, 0);
        fs.lchownSync(target, meta.uid, meta.gid);
      });
      return drain(data);
    }

    if (parts.length === 0) {
      if (type !== 'directory') throw refuse(name, 'the layer root must be a directory');
      this.sys(name, () => this.setMeta(this.root, meta, 'directory'));
      return;
    }
    const target = path.join(this.parentDir(name, parts), parts[parts.length - 1]!);

    if (type === 'link') {
      const linkTo = this.hardlinkTarget(name, h.linkname ?? '', parts);
      this.replace(name, target, false);
      this.sys(name, () => fs.linkSync(linkTo, target));
      const st = fs.lstatSync(target);
      this.sys(name, () => this.setMeta(target, meta, st.isSymbolicLink() ? 'symlink' : 'other'));
      return;
    }
    if (isFile) {
      this.replace(name, target, false);
      await this.writeFile(name, target, size, meta, data);
      this.size += size;
      return;
    }
    if (type === 'directory') {
      this.replace(name, target, true);
      this.sys(name, () => {
        if (!lstatOrNull(target)) fs.mkdirSync(target, 0o700);
        this.setMeta(target, meta, 'directory');
      });
      return;
    }
    if (type === 'symlink') {
      const to = h.linkname ?? '';
      if (to === '' || to.includes('\0')) throw refuse(name, 'symlink target is empty or contains a NUL byte');
      if (Buffer.byteLength(to) > this.limits.maxPathLength) {
        throw refuse(name, `symlink target is longer than ${this.limits.maxPathLength} bytes`);
      }
      this.replace(name, target, false);
      this.sys(name, () => {
        fs.symlinkSync(to, target);
        this.setMeta(target, meta, 'symlink');
      });
      return;
    }
    // character-device, block-device, fifo
    let fmt = S_IFIFO;
    let major = 0;
    let minor = 0;
    if (type === 'character-device' || type === 'block-device') {
      fmt = type === 'character-device' ? S_IFCHR : S_IFBLK;
      major = h.devmajor ?? 0;
      minor = h.devminor ?? 0;
      const problem = deviceProblem(major, minor);
      if (problem) throw refuse(name, problem);
    }
    this.replace(name, target, false);
    this.sys(name, () => {
      try {
        native.mknod(target, fmt | (meta.mode & 0o777), major, minor);
      } catch (err) {
        if (errnoCode(err) === 'EPERM') throw failedPrecondition(`layer entry ${quoteName(name)}: creating device nodes needs CAP_MKNOD`, err);
        throw err;
      }
      this.setMeta(target, meta, 'other');
    });
  }

  /** Sets deferred directory times, deepest first. */
  finish(): void {
    const dirs = [...this.dirTimes.entries()].sort((a, b) => b[0].length - a[0].length);
    for (const [dir, t] of dirs) {
      if (lstatOrNull(dir)?.isDirectory()) fs.lutimesSync(dir, t.atime, t.mtime);
    }
  }

  private meta(h: Header, pax: PaxRecords): Meta {
    const name = h.name;
    const num = (key: string, fallback: number | undefined): number => {
      const v = pax.get(key);
      return v ? Number(v.toString('latin1')) : (fallback ?? 0);
    };
    const mode = h.mode ?? 0;
    const uid = num('uid', h.uid);
    const gid = num('gid', h.gid);
    for (const [what, v] of [['mode', mode], ['uid', uid], ['gid', gid]] as const) {
      if (!Number.isSafeInteger(v) || v < 0) throw refuse(name, `${what} ${pax.has(what) ? JSON.stringify(pax.get(what)!.toString('latin1').slice(0, 40)) : v} is not a whole number ≥ 0`);
      const problem = what === 'mode' ? (v > 0o7777777 ? `mode ${v} is beyond 0o7777777, the largest mode a tar header holds` : undefined) : ownerProblem(what, v);
      if (problem) throw refuse(name, problem);
    }
    const bound = (t: number): number => (Number.isFinite(t) && t >= 0 && t <= MAX_TIME_S ? t : 0);
    const mtime = bound(num('mtime', h.mtime ? h.mtime.getTime() / 1000 : 0));
    // Docker: atime = the later of atime and mtime.
    const atime = Math.max(bound(num('atime', mtime)), mtime);
    const xattrs: [string, Buffer][] = [];
    for (const [key, value] of pax) {
      if (!key.startsWith(XATTR_PAX_PREFIX)) continue;
      const xname = key.slice(XATTR_PAX_PREFIX.length);
      if (xname.startsWith('trusted.overlay.') || xname.startsWith('user.overlay.')) continue;
      const problem = xattrProblem(xname, value.length);
      if (problem) throw refuse(name, problem);
      xattrs.push([xname, value]);
    }
    return { mode: mode & 0o7777, uid, gid, atime, mtime, xattrs };
  }

  /** Owner, xattrs, mode (chown clears setuid and capabilities, so in this order), times. */
  private setMeta(p: string, m: Meta, kind: 'directory' | 'symlink' | 'other'): void {
    fs.lchownSync(p, m.uid, m.gid);
    for (const [n, v] of m.xattrs) setXattr(p, n, v);
    if (kind !== 'symlink') fs.chmodSync(p, m.mode);
    if (kind === 'directory') this.dirTimes.set(p, { atime: m.atime, mtime: m.mtime });
    else fs.lutimesSync(p, m.atime, m.mtime);
  }

  /**
   * The directory holding the last component of parts, after checking that
   * every parent is a real directory (creating missing ones 0755, as Docker
   * does). Never follows a symlink.
   */
  private parentDir(name: string, parts: string[], create = true): string {
    let dir = this.root;
    for (const part of parts.slice(0, -1)) {
      dir = path.join(dir, part);
      const st = lstatOrNull(dir);
      if (st?.isDirectory()) continue;
      if (st?.isSymbolicLink()) throw refuse(name, `path goes through a symlink (${quoteName(path.relative(this.root, dir))})`);
      if (st) throw refuse(name, `parent ${quoteName(path.relative(this.root, dir))} is not a directory`);
      if (!create) throw refuse(name, `parent ${quoteName(path.relative(this.root, dir))} does not exist`);
      this.sys(name, () => fs.mkdirSync(dir, 0o755));
    }
    return dir;
  }

  /** The absolute path of a hard link's target: an earlier non-directory entry of this layer. */
  private hardlinkTarget(name: string, linkname: string, parts: string[]): string {
    const tparts = entryComponents(linkname, this.limits, 'hard link target');
    if (tparts.length === 0) throw refuse(name, 'hard link to the layer root');
    const self = parts.join('/');
    const to = tparts.join('/');
    if (to === self || to.startsWith(self + '/')) throw refuse(name, 'hard link to itself or below itself');
    const dir = this.parentDir(name, tparts, false);
    const target = path.join(dir, tparts[tparts.length - 1]!);
    const st = lstatOrNull(target);
    if (!st) throw refuse(name, `hard link target ${quoteName(linkname)} is not an earlier entry of this layer`);
    if (st.isDirectory()) throw refuse(name, `hard link target ${quoteName(linkname)} is a directory`);
    return target;
  }

  /** Removes whatever is at p (never following it), except a directory a directory entry may reuse. */
  private replace(name: string, p: string, keepDir: boolean): void {
    const st = lstatOrNull(p);
    if (!st) return;
    if (st.isDirectory()) {
      if (keepDir) return;
      this.sys(name, () => fs.rmSync(p, { recursive: true, force: true }));
    } else {
      this.sys(name, () => fs.unlinkSync(p));
    }
  }

  /**
   * File data and metadata use synchronous fd calls: each is a few
   * microseconds on the page cache, while a round trip through libuv's
   * threadpool costs far more per call and dominated extraction time.
   * The event loop still turns between data chunks.
   */
  private async writeFile(name: string, p: string, size: number, m: Meta, data: Entry): Promise<void> {
    const fd = this.sys(name, () => fs.openSync(p, FILE_FLAGS, 0o600));
    try {
      const w = new SparseWriter(fd);
      // Errors of the data stream itself (truncation) pass through unwrapped.
      for await (const chunk of data) this.sys(name, () => w.write(chunk as Buffer));
      if (w.length !== size) throw refuse(name, `data is ${w.length} bytes, header says ${size}`);
      this.sys(name, () => {
        w.finish();
        fs.fchownSync(fd, m.uid, m.gid);
        for (const [n, v] of m.xattrs) setXattr(p, n, v);
        fs.fchmodSync(fd, m.mode);
        fs.futimesSync(fd, m.atime, m.mtime);
      });
    } finally {
      fs.closeSync(fd);
    }
  }

  private sys<T>(name: string, fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      throw err instanceof GearError ? err : wrapSys(name, err);
    }
  }
}


/** System errors an entry can provoke are the layer's fault; the rest are ours. */
const INPUT_ERRNOS = new Set(['ENAMETOOLONG', 'ELOOP', 'ENOTDIR', 'EEXIST', 'EISDIR', 'EPERM', 'EINVAL', 'E2BIG', 'ERANGE', 'EMLINK']);

function wrapSys(name: string, err: unknown): GearError {
  const code = errnoCode(err);
  const msg = `layer entry ${quoteName(name)}: ${(err as Error)?.message ?? String(err)}`;
  if (code === 'ENOSPC' || code === 'EDQUOT') {
    // Not the layer's fault, nor a bug: the node's disk. Retrying after freeing space works.
    return unavailable(
      `${msg}: the filesystem holding the layer store is full; free space on it (remove unused images and containers, or lower the Gear pool cap, --cache-size) and pull again`,
      err,
    );
  }
  return code && INPUT_ERRNOS.has(code) ? invalidArgument(msg, err) : internal(msg, err);
}

function lstatOrNull(p: string): fs.Stats | null {
  try {
    return fs.lstatSync(p);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return null;
    throw err;
  }
}

async function drain(data: Entry): Promise<void> {
  for await (const _ of data) {
    // discard
  }
}

/**
 * Writes file data at increasing offsets, skipping aligned all-zero blocks
 * (seek instead of write) so sparse files stay sparse; finish() sets the size.
 */
class SparseWriter {
  /** Bytes accepted so far. */
  length = 0;
  /** File offset where `pending` starts; always block-aligned. */
  private base = 0;
  private readonly pending = Buffer.alloc(SPARSE_BLOCK);
  private pendingLen = 0;

  constructor(private readonly fd: number) {}

  write(chunk: Buffer): void {
    this.length += chunk.length;
    let off = 0;
    if (this.pendingLen > 0) {
      off = chunk.copy(this.pending, this.pendingLen, 0, Math.min(chunk.length, SPARSE_BLOCK - this.pendingLen));
      this.pendingLen += off;
      if (this.pendingLen < SPARSE_BLOCK) return;
      if (!this.pending.equals(ZERO_BLOCK)) this.put(this.pending, this.base);
      this.base += SPARSE_BLOCK;
      this.pendingLen = 0;
    }
    let run = -1; // start (in chunk) of a run of non-zero blocks
    let runBase = 0;
    while (off + SPARSE_BLOCK <= chunk.length) {
      const zero = ZERO_BLOCK.equals(chunk.subarray(off, off + SPARSE_BLOCK));
      if (zero && run >= 0) {
        this.put(chunk.subarray(run, off), runBase);
        run = -1;
      } else if (!zero && run < 0) {
        run = off;
        runBase = this.base;
      }
      off += SPARSE_BLOCK;
      this.base += SPARSE_BLOCK;
    }
    if (run >= 0) this.put(chunk.subarray(run, off), runBase);
    this.pendingLen = chunk.copy(this.pending, 0, off);
  }

  finish(): void {
    const tail = this.pending.subarray(0, this.pendingLen);
    if (!tail.equals(ZERO_BLOCK.subarray(0, this.pendingLen))) this.put(tail, this.base);
    fs.ftruncateSync(this.fd, this.length);
  }

  private put(buf: Buffer, position: number): void {
    let done = 0;
    while (done < buf.length) done += fs.writeSync(this.fd, buf, done, buf.length - done, position + done);
  }
}
