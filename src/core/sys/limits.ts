/**
 * What Linux (and overlayfs, EROFS) can store of a file's metadata, and the
 * words for what it cannot: one rule set for the layer tars applied to disk
 * (archive/apply.ts) and for Gear index entries (layers/index-entry.ts,
 * index/tree.ts), so the two never disagree about a valid entry.
 */

/** Largest uid or gid: 2^32−2. (uid_t)−1 is "no owner": chown(2) reads it as "unchanged", EROFS shows 65534. */
export const MAX_OWNER_ID = 0xfffffffe;
/** Device numbers dev_t holds: 12 bits of major, 20 of minor (EROFS stores the same encoding). */
export const MAX_DEV_MAJOR = 0xfff;
export const MAX_DEV_MINOR = 0xfffff;
/** Linux XATTR_NAME_MAX and XATTR_SIZE_MAX. */
export const XATTR_NAME_MAX = 255;
export const XATTR_SIZE_MAX = 65536;
/** Linux XATTR_LIST_MAX: listxattr(2) returns at most this many bytes of names (each with its NUL). */
export const XATTR_LIST_MAX = 65536;
/** Longest symlink target Linux stores (PATH_MAX less the NUL). */
export const MAX_SYMLINK_BYTES = 4095;

/** Why an owner id cannot be stored, or undefined. */
export function ownerProblem(what: 'uid' | 'gid', v: number): string | undefined {
  if (!Number.isSafeInteger(v) || v < 0) return `${what} ${v} is not a whole number ≥ 0`;
  if (v > MAX_OWNER_ID) return `${what} ${v} is beyond ${MAX_OWNER_ID}, the largest owner Linux stores (${v === 0xffffffff ? '4294967295 is (uid_t)-1, "no owner"' : 'ids are 32 bits'})`;
  return undefined;
}

/** Why device numbers cannot be stored, or undefined. */
export function deviceProblem(major: number, minor: number): string | undefined {
  if (!Number.isSafeInteger(major) || major < 0) return `devmajor ${major} is not a whole number ≥ 0`;
  if (!Number.isSafeInteger(minor) || minor < 0) return `devminor ${minor} is not a whole number ≥ 0`;
  if (major > MAX_DEV_MAJOR) return `devmajor ${major} is beyond ${MAX_DEV_MAJOR}, the largest major number Linux stores (12 bits)`;
  if (minor > MAX_DEV_MINOR) return `devminor ${minor} is beyond ${MAX_DEV_MINOR}, the largest minor number Linux stores (20 bits)`;
  return undefined;
}

/**
 * Why Linux cannot store this xattr, or undefined: the namespaces are
 * security., system. (POSIX ACLs only), trusted. and user. (anything else is
 * EOPNOTSUPP, which would read as our fault); the name must go on after its
 * namespace and fit XATTR_NAME_MAX; the value XATTR_SIZE_MAX.
 */
export function xattrProblem(name: string, valueBytes: number): string | undefined {
  const shown = JSON.stringify(name.slice(0, 100)) + (name.length > 100 ? '…' : '');
  if (name === '') return 'an xattr with an empty name';
  if (name.includes('\0')) return `xattr ${shown}: the name contains a NUL byte`;
  if (Buffer.byteLength(name) > XATTR_NAME_MAX) return `xattr ${shown}: the name is longer than ${XATTR_NAME_MAX} bytes`;
  const ns = /^(security|system|trusted|user)\./.exec(name);
  if (!ns) {
    const dot = name.indexOf('.');
    return `xattr ${shown}: ${dot > 0 ? `"${name.slice(0, dot + 1)}"` : 'no namespace'} is not an xattr namespace Linux stores (security., system., trusted., user.)`;
  }
  if (name.length === ns[0].length) return `xattr ${shown}: nothing follows the namespace`;
  if (ns[1] === 'system' && name !== 'system.posix_acl_access' && name !== 'system.posix_acl_default') {
    return `xattr ${shown}: of system.*, only system.posix_acl_access and system.posix_acl_default are stored`;
  }
  if (valueBytes > XATTR_SIZE_MAX) return `xattr ${shown}: a value of ${valueBytes} bytes is beyond ${XATTR_SIZE_MAX}, the largest Linux stores`;
  return undefined;
}
