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
import type { IndexManifest } from '../index/manifest.js';
import type { TarHeader } from '../index/tar.js';
import type { GearBlobTuple } from '../lazy/catalog.js';

export const METACOPY_XATTR = 'trusted.overlay.metacopy';
export const REDIRECT_XATTR = 'trusted.overlay.redirect';

/** The redirect of a content digest: `/sha256/ab/<hex>`. */
export function redirectOf(digest: string): string {
  const hex = digest.slice('sha256:'.length);
  return `/sha256/${hex.slice(0, 2)}/${hex}`;
}

/**
 * Largest uid or gid: 2^32−2. (uid_t)−1 is "no owner" to the kernel: chown(2)
 * reads it as "unchanged", and EROFS shows it as the overflow id 65534.
 */
export const MAX_OWNER_ID = 0xfffffffe;
/** Device numbers the kernel's dev_t holds: 12 bits of major, 20 of minor (EROFS stores the same encoding). */
export const MAX_DEV_MAJOR = 0xfff;
export const MAX_DEV_MINOR = 0xfffff;
/** Linux XATTR_NAME_MAX and XATTR_SIZE_MAX. */
export const XATTR_NAME_MAX = 255;
export const XATTR_SIZE_MAX = 65536;
/** Linux XATTR_LIST_MAX: listxattr(2) returns at most this many bytes of names (each with its NUL). */
export const XATTR_LIST_MAX = 65536;
/** Longest symlink target Linux stores (PATH_MAX less the NUL). */
export const MAX_SYMLINK_BYTES = 4095;
/** Docker's boundTime: times outside [epoch, max int64 ns] become the epoch. */
const MAX_TIME_S = 9223372036;

/**
 * Why Linux cannot store an xattr of this name, or undefined: the namespaces
 * are security., system. (POSIX ACLs only), trusted. and user.; the name must
 * go on after its namespace and fit XATTR_NAME_MAX.
 */
export function xattrNameProblem(name: string): string | undefined {
  if (name === '') return 'an empty xattr name';
  if (name.includes('\0')) return `xattr ${JSON.stringify(name.slice(0, 100))}: the name contains a NUL byte`;
  if (Buffer.byteLength(name) > XATTR_NAME_MAX) return `xattr ${JSON.stringify(name.slice(0, 100))}…: the name is longer than ${XATTR_NAME_MAX} bytes`;
  const ns = /^(security|system|trusted|user)\./.exec(name);
  if (!ns) {
    const dot = name.indexOf('.');
    const shown = dot > 0 ? `"${name.slice(0, dot + 1)}"` : 'no namespace';
    return `xattr ${JSON.stringify(name.slice(0, 100))}: ${shown} is not an xattr namespace Linux stores (security., system., trusted., user.)`;
  }
  if (name.length === ns[0].length) return `xattr ${JSON.stringify(name)}: nothing follows the namespace`;
  if (ns[1] === 'system' && name !== 'system.posix_acl_access' && name !== 'system.posix_acl_default') {
    return `xattr ${JSON.stringify(name.slice(0, 100))}: of system.*, only system.posix_acl_access and system.posix_acl_default are stored`;
  }
  return undefined;
}

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
    if (!Number.isSafeInteger(v) || v < 0) throw invalidArgument(`${what} ${v} is not a whole number ≥ 0`);
    if (v > MAX_OWNER_ID) throw invalidArgument(`${what} ${v} is beyond ${MAX_OWNER_ID}, the largest owner Linux stores (${v === 0xffffffff ? '4294967295 is (uid_t)-1, "no owner"' : 'ids are 32 bits'})`);
  }
  const t = h.mtime + h.mtimeNsec / 1e9;
  const mtime = Number.isFinite(t) && t >= 0 && t <= MAX_TIME_S ? t : 0;
  const xattrs: Array<[string, Buffer]> = [];
  let listBytes = 0;
  for (const [name, value] of h.xattrs) {
    if (name.startsWith('trusted.overlay.') || name.startsWith('user.overlay.')) continue;
    listBytes += Buffer.byteLength(name) + 1;
    if (listBytes > XATTR_LIST_MAX) throw invalidArgument(`the names of its ${h.xattrs.size} xattrs take more than ${XATTR_LIST_MAX} bytes (XATTR_LIST_MAX), more than listxattr(2) can return`);
    const problem = xattrNameProblem(name);
    if (problem) throw invalidArgument(problem);
    if (value.length > XATTR_SIZE_MAX) throw invalidArgument(`xattr ${JSON.stringify(name)}: a value of ${value.length} bytes is beyond ${XATTR_SIZE_MAX}, the largest Linux stores`);
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
  if (!Number.isSafeInteger(major) || major < 0) throw invalidArgument(`devmajor ${major} is not a whole number ≥ 0`);
  if (!Number.isSafeInteger(minor) || minor < 0) throw invalidArgument(`devminor ${minor} is not a whole number ≥ 0`);
  if (major > MAX_DEV_MAJOR) throw invalidArgument(`devmajor ${major} is beyond ${MAX_DEV_MAJOR}, the largest major number Linux stores (12 bits)`);
  if (minor > MAX_DEV_MINOR) throw invalidArgument(`devminor ${minor} is beyond ${MAX_DEV_MINOR}, the largest minor number Linux stores (20 bits)`);
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
  /** Distinct Gear files: [digest, size, blobDigest?, blobSize?]. */
  blobs: GearBlobTuple[];
}

export function summarize(manifest: IndexManifest): IndexDirResult {
  const blobs = new Map<string, GearBlobTuple>();
  let bytes = 0;
  for (const f of manifest.files) {
    bytes += f.size;
    if (!blobs.has(f.digest)) blobs.set(f.digest, f.blob ? [f.digest, f.size, f.blob.digest, f.blob.size] : [f.digest, f.size]);
  }
  return { files: manifest.files.length, bytes, blobs: [...blobs.values()] };
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
