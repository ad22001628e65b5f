/**
 * The `tree` of a version 2 index manifest (docs/format.md §3.6): the
 * flattened tree of the image as JSON objects, one per path, in place of the
 * tar entries that follow the manifest in a version 1 index layer. A tree
 * entry carries the same metadata as an index-layer tar header, so readers
 * decode it into a TarHeader and build the index exactly as from a v1 tar.
 *
 * Why: every tar entry costs a Docker pull about 80 µs in dockerd's tar-split
 * path plus a header parse here; a 5,000-path index in one JSON document is
 * one tar entry and one JSON.parse.
 *
 * Decoding validates every member (hostile input). The encoding is canonical:
 * members in a fixed order, default values left out, xattr names sorted, so
 * equal trees encode to equal bytes.
 */
import { invalidArgument } from '../errors.js';
import type { EntryType, TarHeader } from './tar.js';
import { XATTR_NAME_MAX, XATTR_SIZE_MAX } from '../sys/limits.js';
import { encodePackedContent, type PackedContent } from './pack-layout.js';
import { Named, shown, type Where } from './shown.js';

export { shown };

const TYPES: ReadonlySet<string> = new Set<EntryType>(['file', 'link', 'symlink', 'char', 'block', 'dir', 'fifo']);
/** Largest uid, gid or device number (32 bits). */
const MAX_U32 = 0xffffffff;
const MAX_LINK_BYTES = 4096;
const MAX_NAME_BYTES = 256;

/** Content of a regular file of the tree, when it has any (a `files` entry of the manifest). */
export interface TreeFileContent extends PackedContent {
  digest: string;
  size: number;
  blob?: { mediaType: string; digest: string; size: number };
}

/**
 * The canonical JSON object of one entry. `content` is the manifest's file
 * record for a regular file with content (digest, size, blob), else undefined.
 */
export function encodeTreeEntry(h: TarHeader, content: TreeFileContent | undefined): Record<string, unknown> {
  const o: Record<string, unknown> = { path: h.path.replace(/\/+$/, ''), type: h.type };
  const mode = h.mode & 0o7777;
  if (mode !== 0) o.mode = mode;
  if (h.uid !== 0) o.uid = h.uid;
  if (h.gid !== 0) o.gid = h.gid;
  if (h.uname !== '') o.uname = h.uname;
  if (h.gname !== '') o.gname = h.gname;
  if (h.mtime !== 0) o.mtime = h.mtime;
  if (h.mtimeNsec !== 0) o.mtimeNsec = h.mtimeNsec;
  if (h.linkname !== '') o.linkname = h.linkname;
  if (h.devmajor !== 0) o.devmajor = h.devmajor;
  if (h.devminor !== 0) o.devminor = h.devminor;
  if (h.xattrs.size > 0) {
    const x: Record<string, string> = {};
    for (const name of [...h.xattrs.keys()].sort()) x[name] = h.xattrs.get(name)!.toString('base64');
    o.xattrs = x;
  }
  if (content) {
    o.digest = content.digest;
    o.size = content.size;
    if (content.blob) o.blob = { mediaType: content.blob.mediaType, digest: content.blob.digest, size: content.blob.size };
    encodePackedContent(o, content);
  }
  return o;
}

function intIn(v: unknown, min: number, max: number, what: string, where: Where): number {
  if (v === undefined) return 0;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    throw invalidArgument(`${where}: "${what}" must be a whole number in ${min}…${max}, not ${shown(v)}`);
  }
  return v;
}

function shortString(v: unknown, maxBytes: number, what: string, where: Where): string {
  if (v === undefined) return '';
  if (typeof v !== 'string') throw invalidArgument(`${where}: "${what}" must be a string, not ${shown(v)}`);
  if (v.includes('\0')) throw invalidArgument(`${where}: "${what}" contains a NUL byte`);
  const n = Buffer.byteLength(v);
  if (n > maxBytes) throw invalidArgument(`${where}: "${what}" is ${n} bytes, beyond the ${maxBytes} allowed`);
  return v;
}

/**
 * Decodes and validates one tree entry's metadata into a TarHeader (size 0,
 * path without a trailing slash). Path rules, order and hard-link targets are
 * checked by the caller (index-layer.ts checkEntry), content members by
 * manifest.ts. Throws InvalidArgument.
 */
export function decodeTreeEntry(e: unknown, where: Where): TarHeader {
  if (!e || typeof e !== 'object' || Array.isArray(e)) throw invalidArgument(`${where}: not an object`);
  const o = e as Record<string, unknown>;
  if (typeof o.path !== 'string') throw invalidArgument(`${where}: "path" must be a string, not ${shown(o.path)}`);
  // From here on the entry is named by its path too.
  where = new Named(where, o.path);
  if (typeof o.type !== 'string' || !TYPES.has(o.type)) throw invalidArgument(`${where}: "type" must be one of ${[...TYPES].join(', ')}, not ${shown(o.type)}`);
  const type = o.type as EntryType;
  const linkname = shortString(o.linkname, MAX_LINK_BYTES, 'linkname', where);
  if ((type === 'link' || type === 'symlink') !== (linkname !== '')) {
    throw invalidArgument(`${where}: "linkname" is required for hard links and symlinks, and only for them (this is a ${type})`);
  }
  const devmajor = intIn(o.devmajor, 0, MAX_U32, 'devmajor', where);
  const devminor = intIn(o.devminor, 0, MAX_U32, 'devminor', where);
  if ((devmajor !== 0 || devminor !== 0) && type !== 'char' && type !== 'block') {
    throw invalidArgument(`${where}: "devmajor"/"devminor" are for char and block devices only (this is a ${type})`);
  }
  const xattrs = new Map<string, Buffer>();
  if (o.xattrs !== undefined) {
    if (!o.xattrs || typeof o.xattrs !== 'object' || Array.isArray(o.xattrs)) throw invalidArgument(`${where}: "xattrs" must be an object, not ${shown(o.xattrs)}`);
    for (const [name, value] of Object.entries(o.xattrs as Record<string, unknown>)) {
      if (name === '' || name.includes('\0') || Buffer.byteLength(name) > XATTR_NAME_MAX) {
        throw invalidArgument(`${where}: xattr name ${JSON.stringify(name.slice(0, 100))} must be 1-${XATTR_NAME_MAX} bytes without NUL`);
      }
      if (typeof value !== 'string' || value.length > Math.ceil(XATTR_SIZE_MAX / 3) * 4) {
        throw invalidArgument(`${where}: xattr ${JSON.stringify(name)}: the value must be canonical base64 of at most ${XATTR_SIZE_MAX} bytes`);
      }
      const bytes = Buffer.from(value, 'base64');
      if (bytes.toString('base64') !== value || bytes.length > XATTR_SIZE_MAX) {
        throw invalidArgument(`${where}: xattr ${JSON.stringify(name)}: the value must be canonical base64 of at most ${XATTR_SIZE_MAX} bytes`);
      }
      xattrs.set(name, bytes);
    }
  }
  return {
    path: o.path,
    type,
    size: 0,
    mode: intIn(o.mode, 0, 0o7777, 'mode', where),
    uid: intIn(o.uid, 0, MAX_U32, 'uid', where),
    gid: intIn(o.gid, 0, MAX_U32, 'gid', where),
    uname: shortString(o.uname, MAX_NAME_BYTES, 'uname', where),
    gname: shortString(o.gname, MAX_NAME_BYTES, 'gname', where),
    mtime: intIn(o.mtime, Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER, 'mtime', where),
    mtimeNsec: intIn(o.mtimeNsec, 0, 999_999_999, 'mtimeNsec', where),
    linkname,
    devmajor,
    devminor,
    xattrs,
  };
}
