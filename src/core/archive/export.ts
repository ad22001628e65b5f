/**
 * Layer diffs as tar streams (docker commit / build) and their sizes, as
 * Docker's overlay2 driver (moby v20.10) produces them:
 *  - overlayDiff: the layer's upper dir with overlay whiteouts turned into
 *    OCI/AUFS ones (moby TarWithOptions + overlayWhiteoutConverter), read the
 *    way overlay2's upper dir would be (overlaywalk.ts: metacopy data and
 *    redirected dirs come from the merged view);
 *  - exportChanges: a list of changes taken from a whole tree (moby ExportChanges);
 *  - overlayDiffSize / changesSize: moby directory.Size / ChangesSize.
 *
 * Entries follow Docker's tar conventions: relative names, dirs with a
 * trailing '/', mode = st_mode (with the file-type bits), mtime in whole
 * seconds, no atime/ctime, numeric ids only, hard links within the archive
 * as link entries to the first name seen, security.capability as the only
 * xattr (v3 capabilities rewritten to v2, as Docker does), sockets skipped.
 */
import { constants as fsc, promises as fs, type BigIntStats } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { errnoCode } from '../errors.js';
import { getXattr } from '../sys/xattr.js';
import { ChangeKind, type Change } from './changes.js';
import { byteOrder, lstatOrNull, walkOverlayLayer, type OverlayLayerPaths } from './overlaywalk.js';
import { encodeTarHeader, tarPadding, TAR_TRAILER, type TarEntry, type TarType } from './tarwriter.js';

export const WHITEOUT_PREFIX = '.wh.';
export const WHITEOUT_OPAQUE = '.wh..wh..opq';

const S_IFMT = 0o170000;
const TYPES: Record<number, TarType> = {
  0o100000: 'file',
  0o040000: 'dir',
  0o120000: 'symlink',
  0o020000: 'char',
  0o060000: 'block',
  0o010000: 'fifo',
};

const CHUNK = 256 * 1024;

function seconds(st: BigIntStats): number {
  const ns = st.mtimeNs;
  let s = ns / 1_000_000_000n;
  if (ns < 0n && ns % 1_000_000_000n !== 0n) s -= 1n; // floor, like Go's Truncate(time.Second) of Unix()
  return Number(s);
}

function major(rdev: bigint): number {
  return Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
}
function minor(rdev: bigint): number {
  return Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
}

/** security.capability as Docker puts it into a tar (ReadSecurityXattrToTarHeader). */
function capabilityXattr(p: string): Map<string, Buffer> | undefined {
  let cap: Buffer | null;
  try {
    cap = getXattr(p, 'security.capability');
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOENT') return undefined;
    throw err;
  }
  if (cap === null) return undefined;
  let value = Buffer.from(cap);
  // VFS_CAP_REVISION_3 carries a namespace root uid that means nothing outside
  // the user namespace the archive was built in: Docker writes it as revision 2.
  if (value.length > 3 && value[3] === 3) {
    value[3] = 2;
    value = value.subarray(0, 20);
  }
  return new Map([['security.capability', value]]);
}

/** Streams exactly `size` bytes of a regular file (zero-padded if it shrank meanwhile). */
async function* fileData(p: string, size: number): AsyncGenerator<Buffer> {
  let remaining = size;
  const fh = await fs.open(p, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK);
  try {
    const st = await fh.stat();
    if (st.isFile()) {
      while (remaining > 0) {
        const buf = Buffer.allocUnsafe(Math.min(CHUNK, remaining));
        const { bytesRead } = await fh.read(buf, 0, buf.length, null);
        if (bytesRead === 0) break;
        remaining -= bytesRead;
        yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
      }
    }
  } finally {
    await fh.close();
  }
  while (remaining > 0) {
    const n = Math.min(CHUNK, remaining);
    remaining -= n;
    yield Buffer.alloc(n);
  }
}

/**
 * One file as moby's addTarFile writes it (without the whiteout conversion).
 * `seen` maps inode identities to the first name written, for hard links.
 */
async function* fileEntry(
  name: string,
  st: BigIntStats,
  metaPath: string,
  dataPath: string,
  inodeKey: string,
  seen: Map<string, string>,
): AsyncGenerator<Buffer, TarEntry | null> {
  const mode = Number(st.mode);
  const type = TYPES[mode & S_IFMT];
  if (!type) return null; // sockets: Go's tar refuses them and Docker skips them
  const hdr: TarEntry = {
    name: type === 'dir' ? `${name}/` : name,
    type,
    mode,
    uid: Number(st.uid),
    gid: Number(st.gid),
    size: type === 'file' ? Number(st.size) : 0,
    mtime: seconds(st),
  };
  if (type === 'symlink') {
    try {
      hdr.linkname = await fs.readlink(metaPath);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'EINVAL') return null; // gone or replaced meanwhile
      throw err;
    }
  }
  if (type === 'char' || type === 'block') {
    hdr.devmajor = major(st.rdev);
    hdr.devminor = minor(st.rdev);
  }
  const xattrs = capabilityXattr(metaPath);
  if (xattrs) hdr.xattrs = xattrs;
  if (type !== 'dir' && st.nlink > 1n) {
    const first = seen.get(inodeKey);
    if (first !== undefined) {
      hdr.type = 'link';
      hdr.linkname = first;
      hdr.size = 0;
    } else {
      seen.set(inodeKey, name);
    }
  }
  yield encodeTarHeader(hdr);
  if (hdr.type === 'file' && hdr.size > 0) {
    yield* fileData(dataPath, hdr.size);
    yield tarPadding(hdr.size);
  }
  return hdr;
}

function whiteoutName(rel: string): string {
  const dir = path.posix.dirname(rel);
  const base = path.posix.basename(rel);
  return dir === '.' || dir === '/' ? `${WHITEOUT_PREFIX}${base}` : `${dir.replace(/^\//, '')}/${WHITEOUT_PREFIX}${base}`;
}

async function* overlayDiffChunks(p: OverlayLayerPaths): AsyncGenerator<Buffer> {
  const seen = new Map<string, string>();
  for await (const e of walkOverlayLayer(p)) {
    const name = e.rel.slice(1);
    const st = e.stat;
    if (e.whiteout) {
      // overlay's char 0/0 whiteout → an empty regular .wh.NAME file (keeps owner and mtime).
      yield encodeTarHeader({
        name: whiteoutName(e.rel),
        type: 'file',
        mode: 0o600,
        uid: Number(st.uid),
        gid: Number(st.gid),
        size: 0,
        mtime: seconds(st),
      });
      continue;
    }
    const hdr = yield* fileEntry(name, st, e.metaPath, e.dataPath, e.inodeKey, seen);
    if (hdr && hdr.type === 'dir' && e.opaque) {
      // Opaque dir → DIR/.wh..wh..opq right after the dir: owner and permission
      // bits of the dir, no mtime (Docker leaves it zero).
      yield encodeTarHeader({
        name: `${name}/${WHITEOUT_OPAQUE}`,
        type: 'file',
        mode: Number(st.mode) & 0o777,
        uid: Number(st.uid),
        gid: Number(st.gid),
        size: 0,
        mtime: 0,
      });
    }
  }
  yield TAR_TRAILER;
}

/**
 * The diff of an overlay layer against its real parents, as an uncompressed
 * tar stream with OCI whiteouts. Streamed: nothing but one chunk of one file
 * is held in memory. Consumers may destroy the stream early.
 */
export function overlayDiff(p: OverlayLayerPaths): Readable {
  return Readable.from(overlayDiffChunks(p), { objectMode: false });
}

async function* exportChunks(root: string, changes: Change[]): AsyncGenerator<Buffer> {
  const seen = new Map<string, string>();
  const sorted = [...changes].sort((a, b) => byteOrder(a.path, b.path));
  for (const c of sorted) {
    if (c.kind === ChangeKind.Delete) {
      yield encodeTarHeader({
        name: whiteoutName(c.path),
        type: 'file',
        mode: 0,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: Math.floor(Date.now() / 1000),
      });
      continue;
    }
    const abs = path.join(root, c.path);
    const st = await lstatOrNull(abs);
    if (!st) continue; // changed meanwhile (a running container); Docker skips it too
    yield* fileEntry(c.path.replace(/^\/+/, ''), st, abs, abs, `${st.dev}:${st.ino}`, seen);
  }
  yield TAR_TRAILER;
}

/**
 * A tar of the given changes, taken from the tree at root (moby
 * ExportChanges): entries sorted by path, deletions as .wh.NAME, a changed
 * directory as the directory entry alone.
 */
export function exportChanges(root: string, changes: Change[]): Readable {
  return Readable.from(exportChunks(root, changes), { objectMode: false });
}

/**
 * Bytes a layer adds, as overlay2 counts them (moby directory.Size of the
 * upper dir): sizes of all non-directories, each inode once.
 */
export async function overlayDiffSize(p: OverlayLayerPaths): Promise<number> {
  const seen = new Set<string>();
  let size = 0;
  for await (const e of walkOverlayLayer(p)) {
    if (e.stat.isDirectory() || e.stat.size === 0n) continue;
    if (seen.has(e.inodeKey)) continue;
    seen.add(e.inodeKey);
    size += Number(e.stat.size);
  }
  return size;
}

/**
 * Size of the added and modified non-directories of a change list, taken from
 * root (moby ChangesSize: hard-linked inodes counted once).
 */
export async function changesSize(root: string, changes: Change[]): Promise<number> {
  const seen = new Set<string>();
  let size = 0;
  for (const c of changes) {
    if (c.kind !== ChangeKind.Modify && c.kind !== ChangeKind.Add) continue;
    const st = await lstatOrNull(path.join(root, c.path));
    if (!st || st.isDirectory()) continue;
    if (st.nlink > 1n) {
      const key = `${st.dev}:${st.ino}`;
      if (seen.has(key)) continue;
      seen.add(key);
    }
    size += Number(st.size);
  }
  return size;
}
