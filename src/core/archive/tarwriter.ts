/**
 * Tar header encoding for the layer diffs we produce: USTAR blocks plus a PAX
 * extended header when a field does not fit, laid out the way Go's archive/tar
 * (what Docker uses) lays them out.
 *
 * Why not tar-stream's pack: its PAX records are built as JS strings and
 * UTF-8 encoded, so binary xattr values (security.capability) would be
 * corrupted, and it silently replaces a mode of 0 with 0644. Both matter for
 * layer diffs. tar-stream remains the reader (apply side).
 */

export type TarType = 'file' | 'link' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo';

export interface TarEntry {
  /** Relative name without leading '/'; directories end with '/'. */
  name: string;
  type: TarType;
  /** Written as is (Docker writes st_mode including the file-type bits). */
  mode: number;
  uid: number;
  gid: number;
  /** Payload size; 0 for everything but regular files. */
  size: number;
  /** Seconds since the epoch (integer). */
  mtime: number;
  linkname?: string;
  devmajor?: number;
  devminor?: number;
  /** Extended attributes, emitted as SCHILY.xattr.NAME PAX records with raw byte values. */
  xattrs?: Map<string, Buffer>;
}

const BLOCK = 512;
const TYPEFLAG: Record<TarType | 'pax', number> = {
  file: 0x30,
  link: 0x31,
  symlink: 0x32,
  char: 0x33,
  block: 0x34,
  dir: 0x35,
  fifo: 0x36,
  pax: 0x78,
};

/** Two zero blocks end an archive. */
export const TAR_TRAILER = Buffer.alloc(2 * BLOCK);

/** Zero bytes that pad a payload of `size` bytes to a whole block. */
export function tarPadding(size: number): Buffer {
  const rem = size % BLOCK;
  return rem === 0 ? Buffer.alloc(0) : Buffer.alloc(BLOCK - rem);
}

const isAscii = (s: string): boolean => /^[\x00-\x7f]*$/.test(s);
const toAscii = (s: string): string => s.replace(/[^\x00-\x7f]/g, '');

/** Max value of an octal field of `len` bytes (len-1 digits plus NUL). */
const octalMax = (len: number): number => 8 ** (len - 1) - 1;

function writeOctal(buf: Buffer, off: number, len: number, value: number): void {
  const v = value >= 0 && value <= octalMax(len) ? value : 0;
  buf.write(v.toString(8).padStart(len - 1, '0'), off, len - 1, 'ascii');
  buf[off + len - 1] = 0;
}

function writeString(buf: Buffer, off: number, len: number, s: string): void {
  const b = Buffer.from(s, 'utf8');
  b.copy(buf, off, 0, Math.min(len, b.length));
}

/** Go's splitUSTARPath: split a long ASCII name into prefix (≤155) and name (≤100). */
function splitUstar(name: string): [string, string] | null {
  let length = name.length;
  if (length <= 100 || !isAscii(name)) return null;
  if (length > 156) length = 156;
  else if (name[length - 1] === '/') length--;
  const i = name.lastIndexOf('/', length - 1);
  const nlen = name.length - i - 1;
  if (i <= 0 || nlen > 100 || nlen === 0 || i > 155) return null;
  return [name.slice(0, i), name.slice(i + 1)];
}

function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(` ${key}=`, 'utf8'), value, Buffer.from('\n')]);
  let size = body.length + 1;
  while (String(size).length + body.length !== size) size = String(size).length + body.length;
  return Buffer.concat([Buffer.from(String(size), 'ascii'), body]);
}

function rawHeader(
  fields: {
    name: string;
    mode: number;
    uid: number;
    gid: number;
    size: number;
    mtime: number;
    typeflag: number;
    linkname: string;
    devmajor: number;
    devminor: number;
    prefix: string;
  },
): Buffer {
  const b = Buffer.alloc(BLOCK);
  writeString(b, 0, 100, fields.name);
  writeOctal(b, 100, 8, fields.mode);
  writeOctal(b, 108, 8, fields.uid);
  writeOctal(b, 116, 8, fields.gid);
  writeOctal(b, 124, 12, fields.size);
  writeOctal(b, 136, 12, fields.mtime);
  b.fill(0x20, 148, 156);
  b[156] = fields.typeflag;
  writeString(b, 157, 100, fields.linkname);
  b.write('ustar\x0000', 257, 8, 'binary');
  writeOctal(b, 329, 8, fields.devmajor);
  writeOctal(b, 337, 8, fields.devminor);
  writeString(b, 345, 155, fields.prefix);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += b[i]!;
  writeOctal(b, 148, 7, sum);
  b[155] = 0x20;
  return b;
}

/**
 * The header block(s) of one entry: an optional PAX extended header (with its
 * padded payload) followed by the USTAR header. The caller writes `size`
 * payload bytes and tarPadding(size) after it.
 */
export function encodeTarHeader(e: TarEntry): Buffer {
  const pax = new Map<string, Buffer>();
  let name = e.name;
  let prefix = '';
  if (!isAscii(name) || name.length > 100) {
    const split = splitUstar(name);
    if (split) [prefix, name] = split;
    else {
      pax.set('path', Buffer.from(e.name, 'utf8'));
      name = toAscii(e.name).slice(0, 100);
    }
  }
  let linkname = e.linkname ?? '';
  if (!isAscii(linkname) || linkname.length > 100) {
    pax.set('linkpath', Buffer.from(linkname, 'utf8'));
    linkname = toAscii(linkname).slice(0, 100);
  }
  const num = (key: string, v: number, len: number): void => {
    if (v < 0 || v > octalMax(len) || !Number.isInteger(v)) pax.set(key, Buffer.from(String(Math.trunc(v)), 'ascii'));
  };
  num('uid', e.uid, 8);
  num('gid', e.gid, 8);
  num('size', e.size, 12);
  num('mtime', e.mtime, 12);
  for (const [k, v] of e.xattrs ?? []) pax.set(`SCHILY.xattr.${k}`, v);

  const main = rawHeader({
    name,
    mode: e.mode,
    uid: e.uid,
    gid: e.gid,
    size: e.size,
    mtime: e.mtime,
    typeflag: TYPEFLAG[e.type],
    linkname,
    devmajor: e.devmajor ?? 0,
    devminor: e.devminor ?? 0,
    prefix,
  });
  if (pax.size === 0) return main;

  // Records in key order, as Go writes them.
  const keys = [...pax.keys()].sort();
  const data = Buffer.concat(keys.map((k) => paxRecord(k, pax.get(k)!)));
  const trimmed = e.name.replace(/\/+$/, '');
  const slash = trimmed.lastIndexOf('/');
  const paxName = toAscii(`${trimmed.slice(0, slash + 1)}PaxHeaders.0/${trimmed.slice(slash + 1)}`)
    .slice(0, 100)
    .replace(/\/+$/, '');
  const paxHdr = rawHeader({
    name: paxName,
    mode: 0,
    uid: 0,
    gid: 0,
    size: data.length,
    mtime: 0,
    typeflag: TYPEFLAG.pax,
    linkname: '',
    devmajor: 0,
    devminor: 0,
    prefix: '',
  });
  return Buffer.concat([paxHdr, data, tarPadding(data.length), main]);
}
