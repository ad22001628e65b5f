/**
 * What both forms of a layer's index (index-dir.ts: a directory tree;
 * index-image.ts: an EROFS image) need of one index-layer entry: the overlay
 * xattrs of a Gear file, the entry's metadata validated against what Linux,
 * overlayfs and EROFS can store, the error that names the entry, and the
 * summary of a manifest. Kept apart so that neither form imports the other.
 *
 * Every refusal names the entry, the field and the rule:
 *   gear index layer: entry "dev/x": devmajor 4096 is beyond 4095, the largest major number Linux stores (12 bits)
 */
import { errnoCode, GearError, internal, invalidArgument } from '../errors.js';
import type { IndexFile, IndexManifest } from '../index/manifest.js';
import type { TarHeader } from '../index/tar.js';
import type { GearBlobTuple, StoredLayout } from '../lazy/catalog.js';
import type { PackLoc } from '../fetcher/pack-types.js';
import { deviceProblem, MAX_SYMLINK_BYTES, ownerProblem, XATTR_LIST_MAX, xattrProblem } from '../sys/limits.js';

export const METACOPY_XATTR = 'trusted.overlay.metacopy';
export const REDIRECT_XATTR = 'trusted.overlay.redirect';

/** The redirect of a content digest: `/sha256/ab/<hex>`. */
export function redirectOf(digest: string): string {
  const hex = digest.slice('sha256:'.length);
  return `/sha256/${hex.slice(0, 2)}/${hex}`;
}

/** Docker's boundTime: times outside [epoch, max int64 ns] become the epoch. */
const MAX_TIME_S = 9223372036;

export interface EntryMeta {
  mode: number;
  uid: number;
  gid: number;
  atime: number;
  mtime: number;
  xattrs: Array<[string, Buffer]>;
}

/**
 * Validated metadata of an entry, normalised as archive/apply.ts does for any
 * layer: overlay's private xattrs dropped, times outside Docker's bounds made
 * the epoch. Throws InvalidArgument naming the field and the rule (the caller
 * adds the entry: entryError).
 */
export function entryMeta(h: TarHeader): EntryMeta {
  for (const [what, v] of [['uid', h.uid], ['gid', h.gid]] as const) {
    const problem = ownerProblem(what, v);
    if (problem) throw invalidArgument(problem);
  }
  const t = h.mtime + h.mtimeNsec / 1e9;
  const mtime = Number.isFinite(t) && t >= 0 && t <= MAX_TIME_S ? t : 0;
  const xattrs: Array<[string, Buffer]> = [];
  let listBytes = 0;
  for (const [name, value] of h.xattrs) {
    if (name.startsWith('trusted.overlay.') || name.startsWith('user.overlay.')) continue;
    listBytes += Buffer.byteLength(name) + 1;
    if (listBytes > XATTR_LIST_MAX) throw invalidArgument(`the names of its ${h.xattrs.size} xattrs take more than ${XATTR_LIST_MAX} bytes (XATTR_LIST_MAX), more than listxattr(2) can return`);
    const problem = xattrProblem(name, value.length);
    if (problem) throw invalidArgument(problem);
    xattrs.push([name, value]);
  }
  return { mode: h.mode & 0o7777, uid: h.uid, gid: h.gid, atime: mtime, mtime, xattrs };
}

/** The target of a symlink entry, checked against what Linux stores. */
export function symlinkTarget(h: TarHeader): string {
  if (h.linkname === '') throw invalidArgument('a symlink with an empty target');
  const n = Buffer.byteLength(h.linkname);
  if (n > MAX_SYMLINK_BYTES) throw invalidArgument(`a symlink target of ${n} bytes is beyond ${MAX_SYMLINK_BYTES}, the longest Linux stores`);
  return h.linkname;
}

/** The device numbers of a char or block entry, checked against what dev_t holds. */
export function entryDevice(h: TarHeader): { major: number; minor: number } {
  const { devmajor: major, devminor: minor } = h;
  const problem = deviceProblem(major, minor);
  if (problem) throw invalidArgument(problem);
  return { major, minor };
}

/** System errors an entry can provoke are the layer's fault; the rest are ours (as in archive/apply.ts). */
const INPUT_ERRNOS = new Set(['ENAMETOOLONG', 'ELOOP', 'ENOTDIR', 'EEXIST', 'EISDIR', 'EPERM', 'EINVAL', 'E2BIG', 'ERANGE', 'EMLINK', 'EOPNOTSUPP', 'ENOTSUP']);

const ENTRY_PREFIX = 'gear index layer: entry ';

/**
 * The error of entry `p`, naming it: a GearError keeps its class and gets the
 * entry in front of its message (once); a system error is the layer's fault
 * (InvalidArgument) when an entry can provoke it, else Internal.
 */
export function entryError(p: string, err: unknown): GearError {
  const where = `${ENTRY_PREFIX}${JSON.stringify(p.slice(0, 200))}`;
  if (err instanceof GearError) {
    if (err.message.startsWith(ENTRY_PREFIX) || err.message.startsWith('gear index')) return err;
    return new GearError(err.class, `${where}: ${err.message}`, { cause: err });
  }
  const msg = `${where}: ${(err as Error)?.message ?? String(err)}`;
  const code = errnoCode(err);
  return code && INPUT_ERRNOS.has(code) ? invalidArgument(msg, err) : internal(msg, err);
}

export interface IndexDirResult {
  files: number;
  /** Sum of the real sizes of the manifest's files. */
  bytes: number;
  /** Distinct Gear files: [digest, size, blobDigest?, blobSize?], or [digest, size, layout] (format v3). */
  blobs: GearBlobTuple[];
  /** Format v3: the packs the layouts of `blobs` index. */
  packs?: PackLoc[];
}

/**
 * How a layer record stores where a v3 file's bytes are (catalog.ts StoredLayout), or undefined for
 * v1/v2. `group` numbers the directory of the file's path, for the directory read-ahead.
 */
function storedLayout(f: IndexFile, group: number): StoredLayout | undefined {
  if (f.member) {
    const m = f.member;
    return m.encoding === 'raw' ? { p: m.pack, o: m.offset, l: m.length, e: 'raw', g: group } : { p: m.pack, o: m.offset, l: m.length, g: group };
  }
  if (f.chunks && f.chunkSize) {
    return { cs: f.chunkSize, c: f.chunks.map((c) => (c.encoding === 'raw' ? [c.pack, c.offset, c.length, c.digest, 1] : [c.pack, c.offset, c.length, c.digest])) };
  }
  return undefined;
}

export function summarize(manifest: IndexManifest): IndexDirResult {
  const blobs = new Map<string, GearBlobTuple>();
  const dirs = new Map<string, number>();
  let bytes = 0;
  for (const f of manifest.files) {
    bytes += f.size;
    if (blobs.has(f.digest)) continue;
    const dir = f.path.slice(0, Math.max(0, f.path.lastIndexOf('/')));
    let group = dirs.get(dir);
    if (group === undefined) dirs.set(dir, (group = dirs.size));
    const layout = storedLayout(f, group);
    blobs.set(f.digest, layout ? [f.digest, f.size, layout] : f.blob ? [f.digest, f.size, f.blob.digest, f.blob.size] : [f.digest, f.size]);
  }
  const packs = manifest.packs;
  return { files: manifest.files.length, bytes, blobs: [...blobs.values()], ...(packs ? { packs: packs.map((p) => ({ digest: p.digest, size: p.size })) } : {}) };
}

/** Where a node already knows a content's size from: the pool (the file itself) or another index layer. */
export interface KnownSizes {
  /** The size of the content `digest` in the pool, or undefined when it is not there. */
  pool?: (digest: string) => number | undefined;
  /** The size other index layers list for `digest`, or undefined. */
  listed?: (digest: string) => number | undefined;
}

/**
 * Refuses a manifest that gives a content a size other than the one the node
 * already has for it (a pool file of that digest, or another layer's index):
 * overlay would show the index's size and read the pool file's bytes, so stat
 * and read would disagree. InvalidArgument naming the path, the digest and
 * both sizes.
 */
export function checkKnownSizes(manifest: IndexManifest, known: KnownSizes): void {
  const seen = new Set<string>();
  for (const f of manifest.files) {
    if (seen.has(f.digest)) continue; // the manifest parser checked that a digest has one size
    seen.add(f.digest);
    const inPool = known.pool?.(f.digest);
    if (inPool !== undefined && inPool !== f.size) {
      throw invalidArgument(
        `gear index layer: file ${JSON.stringify(f.path.slice(0, 200))}: the index says ${f.digest} is ${f.size} bytes, but the pool holds that content with ${inPool} bytes (a content has one size: re-convert the image with gear convert)`,
      );
    }
    const listed = known.listed?.(f.digest);
    if (listed !== undefined && listed !== f.size) {
      throw invalidArgument(
        `gear index layer: file ${JSON.stringify(f.path.slice(0, 200))}: the index says ${f.digest} is ${f.size} bytes, but another index layer on this node lists it with ${listed} bytes (a content has one size: re-convert the image with gear convert)`,
      );
    }
  }
}
