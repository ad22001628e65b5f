/**
 * A small, strict tar codec: a streaming reader for layer tars (ustar, PAX,
 * GNU long names) and a deterministic writer for index layers.
 *
 * Why not tar-stream: it decodes PAX values as UTF-8 strings, which corrupts
 * binary xattr values such as `security.capability`, and its writer cannot
 * encode them. This reader keeps PAX values as bytes.
 *
 * Parser-differential rules (TARmageddon, CVE-2025-62518): a PAX `size`
 * overrides the header size, and header-only types (links, directories,
 * devices, fifos) never carry a body whatever their size field says: the same
 * choices as Go's archive/tar, which Docker and containerd use.
 */
import { GearError, invalidArgument } from '../errors.js';

export type EntryType = 'file' | 'link' | 'symlink' | 'char' | 'block' | 'dir' | 'fifo';

/** One tar entry's metadata, after PAX / GNU extensions are applied. */
export interface TarHeader {
  /** The path as stored in the archive (not normalised). */
  path: string;
  type: EntryType;
  /** Body size in bytes; 0 for every type except `file`. */
  size: number;
  /** Permission bits plus setuid/setgid/sticky (mode & 0o7777). */
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  /** Modification time, whole seconds since the epoch (may be negative). */
  mtime: number;
  /** Sub-second part of the modification time in nanoseconds (from a PAX `mtime`). */
  mtimeNsec: number;
  /** Target of a hard link or symlink; "" otherwise. */
  linkname: string;
  devmajor: number;
  devminor: number;
  /** Extended attributes (PAX `SCHILY.xattr.*`), values as raw bytes. */
  xattrs: Map<string, Buffer>;
}

export interface TarEntry {
  header: TarHeader;
  /** Offset of the body in the input stream (bytes from its start). */
  dataOffset: number;
  /** The entry's body. May be left unread: the reader skips what is left. */
  body(): AsyncIterable<Buffer>;
}

/** Limits against hostile archives. */
export interface TarLimits {
  /** Longest path or link name in bytes (default 16 KiB). */
  maxPathBytes: number;
  /** Largest PAX extended header in bytes (default 1 MiB). */
  maxPaxBytes: number;
}

export const DEFAULT_TAR_LIMITS: TarLimits = { maxPathBytes: 16 * 1024, maxPaxBytes: 1024 * 1024 };

const BLOCK = 512;
const ZERO_BLOCK = Buffer.alloc(BLOCK);

/** The archive is malformed or ends early. Class InvalidArgument. */
export class TarFormatError extends GearError {
  constructor(message: string) {
    super('InvalidArgument', message);
    this.name = 'TarFormatError';
  }
}

/** Pulls exact byte counts out of an async iterable of chunks. */
class ByteReader {
  private readonly it: AsyncIterator<Uint8Array>;
  private buf: Buffer = Buffer.alloc(0);
  private ended = false;
  /** Bytes handed out so far. */
  offset = 0;

  constructor(source: AsyncIterable<Uint8Array>) {
    this.it = source[Symbol.asyncIterator]();
  }

  private async fill(): Promise<boolean> {
    if (this.ended) return false;
    for (;;) {
      const r = await this.it.next();
      if (r.done) {
        this.ended = true;
        return false;
      }
      if (r.value.length === 0) continue;
      const chunk = Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value);
      this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
      return true;
    }
  }

  /** Exactly n bytes; null at a clean end of input; throws when the input ends inside them. */
  async readExact(n: number, what: string): Promise<Buffer | null> {
    while (this.buf.length < n) {
      if (!(await this.fill())) {
        if (this.buf.length === 0) return null;
        throw new TarFormatError(`truncated tar: input ended inside ${what}`);
      }
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    this.offset += n;
    return out;
  }

  /** Up to max (> 0) bytes, at least one; throws at end of input. */
  async readSome(max: number, what: string): Promise<Buffer> {
    if (this.buf.length === 0 && !(await this.fill())) {
      throw new TarFormatError(`truncated tar: input ended inside ${what}`);
    }
    const n = Math.min(max, this.buf.length);
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    this.offset += n;
    return out;
  }

  async skip(n: number, what: string): Promise<void> {
    let left = n;
    while (left > 0) left -= (await this.readSome(left, what)).length;
  }

  /** Reads the rest of the input, so that verifying streams upstream see their end. */
  async drain(): Promise<void> {
    this.buf = Buffer.alloc(0);
    while (await this.fill()) {
      this.offset += this.buf.length;
      this.buf = Buffer.alloc(0);
    }
  }
}

function cstring(b: Buffer): string {
  const nul = b.indexOf(0);
  return (nul < 0 ? b : b.subarray(0, nul)).toString('utf8');
}

function parseNumeric(b: Buffer, field: string): number {
  if (b.length > 0 && (b[0]! & 0x80) !== 0) {
    // GNU base-256: big-endian two's complement; only non-negative values are accepted.
    if ((b[0]! & 0x40) !== 0) throw new TarFormatError(`field ${field} is negative (a base-256 value below zero); it must be ≥ 0`);
    let v = b[0]! & 0x3f;
    for (let i = 1; i < b.length; i++) {
      v = v * 256 + b[i]!;
      if (v > Number.MAX_SAFE_INTEGER) throw new TarFormatError(`field ${field} is beyond 2^53−1`);
    }
    return v;
  }
  const s = b.toString('latin1').replace(/\0.*$/s, '').trim();
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw new TarFormatError(`field ${field} ${JSON.stringify(s)} is not an octal number`);
  const v = parseInt(s, 8);
  if (!Number.isSafeInteger(v)) throw new TarFormatError(`field ${field} is beyond 2^53−1`);
  return v;
}

/** Runs a parse step of tar entry n, putting the entry in front of any TarFormatError it throws. */
function inEntry<T>(n: number, offset: number, path: string | undefined, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (!(err instanceof TarFormatError)) throw err;
    const name = path === undefined ? '' : ` ${JSON.stringify(path.slice(0, 200))}`;
    throw new TarFormatError(`tar entry ${n}${name} (header at offset ${offset}): ${err.message}`);
  }
}

function checksumOk(h: Buffer): boolean {
  const stored = parseNumeric(h.subarray(148, 156), 'checksum');
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const c = i >= 148 && i < 156 ? 0x20 : h[i]!;
    unsigned += c;
    signed += c >= 0x80 ? c - 256 : c;
  }
  return stored === unsigned || stored === signed;
}

function decimal(v: Buffer, key: string): number {
  const s = v.toString('latin1');
  if (!/^[0-9]{1,16}$/.test(s)) throw new TarFormatError(`PAX record ${key} ${JSON.stringify(s.slice(0, 40))} is not a decimal number ≥ 0`);
  const n = Number(s);
  if (!Number.isSafeInteger(n)) throw new TarFormatError(`PAX record ${key} ${s} is beyond 2^53−1`);
  return n;
}

/** PAX records `"<len> <key>=<value>\n"`; values are kept as bytes. */
export function parsePaxRecords(buf: Buffer): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let i = 0;
  while (i < buf.length) {
    if (buf[i] === 0) break; // NUL padding after the last record
    const sp = buf.indexOf(0x20, i);
    if (sp < 0 || sp - i > 12) throw new TarFormatError('malformed PAX record length');
    const lenText = buf.subarray(i, sp).toString('latin1');
    if (!/^[0-9]+$/.test(lenText)) throw new TarFormatError('malformed PAX record length');
    const len = Number(lenText);
    if (len <= sp - i + 1 || i + len > buf.length) throw new TarFormatError('PAX record length out of range');
    const rec = buf.subarray(sp + 1, i + len);
    if (rec[rec.length - 1] !== 0x0a) throw new TarFormatError('PAX record does not end with a newline');
    const eq = rec.indexOf(0x3d);
    if (eq <= 0) throw new TarFormatError('PAX record without a key');
    out.set(rec.subarray(0, eq).toString('utf8'), Buffer.from(rec.subarray(eq + 1, rec.length - 1)));
    i += len;
  }
  return out;
}

function parsePaxTime(v: Buffer): { sec: number; nsec: number } {
  const m = /^(-?)([0-9]{1,15})(?:\.([0-9]*))?$/.exec(v.toString('latin1'));
  if (!m) throw new TarFormatError(`PAX record mtime ${JSON.stringify(v.toString('latin1').slice(0, 40))} is not a decimal time`);
  const whole = Number(m[2]);
  const frac = Number((m[3] ?? '').slice(0, 9).padEnd(9, '0'));
  if (m[1] !== '-') return { sec: whole, nsec: frac };
  // "-1.5" is 1.5 s before the epoch: whole seconds -2, plus 0.5 s.
  return frac === 0 ? { sec: -whole, nsec: 0 } : { sec: -whole - 1, nsec: 1e9 - frac };
}

const TYPES: Record<string, EntryType> = {
  '0': 'file',
  '\0': 'file',
  '7': 'file',
  '1': 'link',
  '2': 'symlink',
  '3': 'char',
  '4': 'block',
  '5': 'dir',
  '6': 'fifo',
};

/**
 * Reads a tar stream entry by entry. The archive ends at the first zero block
 * (or at a clean end of input on a block boundary); the rest of the input is
 * then read and discarded, so digest-verifying streams upstream always reach
 * their end check. Throws TarFormatError on malformed or truncated input.
 */
export async function* readTar(
  source: AsyncIterable<Uint8Array>,
  limits: TarLimits = DEFAULT_TAR_LIMITS,
): AsyncGenerator<TarEntry> {
  const r = new ByteReader(source);
  let longName: string | undefined;
  let longLink: string | undefined;
  let pax: Map<string, Buffer> | undefined;
  for (let n = 0; ; n++) {
    const h = await r.readExact(BLOCK, 'a header');
    if (h === null || h.equals(ZERO_BLOCK)) {
      if (longName !== undefined || longLink !== undefined || pax !== undefined) {
        throw new TarFormatError('truncated tar: extension header without an entry');
      }
      await r.drain();
      return;
    }
    const at = r.offset - BLOCK;
    const rawName = cstring(h.subarray(0, 100));
    if (!inEntry(n, at, rawName, () => checksumOk(h))) {
      throw new TarFormatError(`tar entry ${n} ${JSON.stringify(rawName.slice(0, 200))} (header at offset ${at}): bad header checksum (not a tar, or corrupt)`);
    }
    const flag = String.fromCharCode(h[156]!);
    let size = inEntry(n, at, longName ?? rawName, () => parseNumeric(h.subarray(124, 136), 'size'));
    if (flag === 'x' || flag === 'g' || flag === 'L' || flag === 'K') {
      const cap = flag === 'x' || flag === 'g' ? limits.maxPaxBytes : limits.maxPathBytes;
      if (size > cap) throw new TarFormatError(`tar entry ${n} (header at offset ${at}): an extension header (type ${flag}) of ${size} bytes, beyond the ${cap} allowed`);
      const body = size === 0 ? Buffer.alloc(0) : await r.readExact(size, 'an extension header');
      if (body === null) throw new TarFormatError('truncated tar: input ended inside an extension header');
      await r.skip((BLOCK - (size % BLOCK)) % BLOCK, 'padding');
      if (flag === 'x') pax = inEntry(n, at, undefined, () => parsePaxRecords(body));
      else if (flag === 'L') longName = cstring(body);
      else if (flag === 'K') longLink = cstring(body);
      // 'g' (global PAX) is ignored, as Docker's layer applier does.
      continue;
    }
    const type = TYPES[flag];
    if (type === undefined) {
      throw new TarFormatError(`tar entry ${n} ${JSON.stringify((longName ?? rawName).slice(0, 200))}: unsupported type flag ${JSON.stringify(flag)} (GNU sparse, multi-volume and vendor types are not read)`);
    }
    const magic = h.subarray(257, 263).toString('latin1');
    const version = h.subarray(263, 265).toString('latin1');
    let path = cstring(h.subarray(0, 100));
    if (magic === 'ustar\0' && version === '00') {
      const prefix = cstring(h.subarray(345, 500));
      if (prefix) path = `${prefix}/${path}`;
    }
    const named = pax?.get('path')?.toString('utf8') ?? longName ?? path;
    const header: TarHeader = inEntry(n, at, named, () => ({
      path: longName ?? path,
      type,
      size,
      mode: parseNumeric(h.subarray(100, 108), 'mode') & 0o7777,
      uid: parseNumeric(h.subarray(108, 116), 'uid'),
      gid: parseNumeric(h.subarray(116, 124), 'gid'),
      uname: cstring(h.subarray(265, 297)),
      gname: cstring(h.subarray(297, 329)),
      mtime: parseNumeric(h.subarray(136, 148), 'mtime'),
      mtimeNsec: 0,
      linkname: longLink ?? cstring(h.subarray(157, 257)),
      devmajor: type === 'char' || type === 'block' ? parseNumeric(h.subarray(329, 337), 'devmajor') : 0,
      devminor: type === 'char' || type === 'block' ? parseNumeric(h.subarray(337, 345), 'devminor') : 0,
      xattrs: new Map(),
    }));
    const records = pax;
    if (records) {
      inEntry(n, at, named, () => {
        for (const [key, v] of records) {
          if (key === 'path') header.path = v.toString('utf8');
          else if (key === 'linkpath') header.linkname = v.toString('utf8');
          else if (key === 'size') size = decimal(v, key);
          else if (key === 'uid') header.uid = decimal(v, key);
          else if (key === 'gid') header.gid = decimal(v, key);
          else if (key === 'uname') header.uname = v.toString('utf8');
          else if (key === 'gname') header.gname = v.toString('utf8');
          else if (key === 'mtime') {
            const t = parsePaxTime(v);
            header.mtime = t.sec;
            header.mtimeNsec = t.nsec;
          } else if (key.startsWith('SCHILY.xattr.')) header.xattrs.set(key.slice('SCHILY.xattr.'.length), v);
        }
      });
    }
    longName = longLink = pax = undefined;
    const shownPath = JSON.stringify(header.path.slice(0, 200));
    if (Buffer.byteLength(header.path) > limits.maxPathBytes || Buffer.byteLength(header.linkname) > limits.maxPathBytes) {
      throw new TarFormatError(`tar entry ${n} ${shownPath}: the path or link name is longer than ${limits.maxPathBytes} bytes`);
    }
    if (header.path.includes('\0') || header.linkname.includes('\0')) {
      throw new TarFormatError(`tar entry ${n} ${shownPath}: the path or link name contains a NUL byte`);
    }
    if (type !== 'file') size = 0;
    header.size = size;
    let remaining = size;
    const what = `the body of ${JSON.stringify(header.path)}`;
    yield {
      header,
      dataOffset: r.offset,
      async *body() {
        while (remaining > 0) {
          const chunk = await r.readSome(remaining, what);
          remaining -= chunk.length;
          yield chunk;
        }
      },
    };
    await r.skip(remaining, what);
    remaining = 0;
    await r.skip((BLOCK - (size % BLOCK)) % BLOCK, 'padding');
  }
}

// ---------------------------------------------------------------------------
// Writer

const OCTAL_LIMIT = (width: number) => 8 ** (width - 1) - 1;

function putString(h: Buffer, off: number, width: number, s: string): boolean {
  const b = Buffer.from(s, 'utf8');
  b.copy(h, off, 0, Math.min(width, b.length));
  return b.length <= width;
}

function putOctal(h: Buffer, off: number, width: number, v: number): void {
  h.write(v.toString(8).padStart(width - 1, '0') + '\0', off, width, 'latin1');
}

function paxRecord(key: string, value: Buffer): Buffer {
  const rest = Buffer.byteLength(key) + value.length + 3; // space, '=', newline
  let len = rest + String(rest).length;
  if (String(len).length !== String(len - rest).length) len = rest + String(len).length;
  return Buffer.concat([Buffer.from(`${len} ${key}=`, 'utf8'), value, Buffer.from('\n')]);
}

const TYPEFLAG: Record<EntryType, string> = {
  file: '0',
  link: '1',
  symlink: '2',
  char: '3',
  block: '4',
  dir: '5',
  fifo: '6',
};

function rawHeader(name: string, flag: string, size: number, hd: Partial<TarHeader>): Buffer {
  const h = Buffer.alloc(BLOCK);
  putString(h, 0, 100, name);
  putOctal(h, 100, 8, (hd.mode ?? 0) & 0o7777);
  putOctal(h, 108, 8, Math.min(hd.uid ?? 0, OCTAL_LIMIT(8)));
  putOctal(h, 116, 8, Math.min(hd.gid ?? 0, OCTAL_LIMIT(8)));
  putOctal(h, 124, 12, size);
  const mt = hd.mtime ?? 0;
  putOctal(h, 136, 12, mt >= 0 && mt <= OCTAL_LIMIT(12) ? mt : 0);
  h.write(flag, 156, 1, 'latin1');
  putString(h, 157, 100, hd.linkname ?? '');
  h.write('ustar\u000000', 257, 8, 'latin1');
  putString(h, 265, 32, hd.uname ?? '');
  putString(h, 297, 32, hd.gname ?? '');
  putOctal(h, 329, 8, hd.devmajor ?? 0);
  putOctal(h, 337, 8, hd.devminor ?? 0);
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += h[i]!;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return h;
}

/** Zero padding that completes a body of `size` bytes to a whole block. */
export function tarPadding(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** The end-of-archive marker: two zero blocks. */
export function tarTrailer(): Buffer {
  return Buffer.alloc(2 * BLOCK);
}

/**
 * Encodes the header block(s) of one entry, deterministically: a PAX extended
 * header (records sorted by key) precedes the ustar header whenever a value
 * does not fit ustar: a name or link name over 100 bytes, ids over 2097151,
 * uname/gname over 32 bytes, times out of range or with nanoseconds, xattrs.
 * The caller writes `h.size` body bytes and `tarPadding(h.size)` after it.
 */
export function encodeTarHeader(h: TarHeader): Buffer {
  if (h.type !== 'file' && h.size !== 0) throw new TypeError(`tar entry ${h.path}: only files have a body`);
  const records = new Map<string, Buffer>();
  const name = h.type === 'dir' && !h.path.endsWith('/') ? `${h.path}/` : h.path;
  const fits = (s: string, w: number) => Buffer.byteLength(s) <= w;
  if (!fits(name, 100)) records.set('path', Buffer.from(name));
  if (!fits(h.linkname, 100)) records.set('linkpath', Buffer.from(h.linkname));
  if (h.uid > OCTAL_LIMIT(8)) records.set('uid', Buffer.from(String(h.uid)));
  if (h.gid > OCTAL_LIMIT(8)) records.set('gid', Buffer.from(String(h.gid)));
  if (!fits(h.uname, 32)) records.set('uname', Buffer.from(h.uname));
  if (!fits(h.gname, 32)) records.set('gname', Buffer.from(h.gname));
  if (h.size > OCTAL_LIMIT(12)) records.set('size', Buffer.from(String(h.size)));
  if (h.mtimeNsec !== 0 || h.mtime < 0 || h.mtime > OCTAL_LIMIT(12)) {
    records.set('mtime', Buffer.from(formatPaxTime(h.mtime, h.mtimeNsec)));
  }
  for (const [k, v] of h.xattrs) records.set(`SCHILY.xattr.${k}`, v);
  const parts: Buffer[] = [];
  if (records.size > 0) {
    const keys = [...records.keys()].sort();
    const body = Buffer.concat(keys.map((k) => paxRecord(k, records.get(k)!)));
    parts.push(rawHeader('././@PaxHeader', 'x', body.length, {}), body, tarPadding(body.length));
  }
  const truncName = fits(name, 100) ? name : Buffer.from(name).subarray(0, 100).toString('latin1');
  const truncLink = fits(h.linkname, 100) ? h.linkname : Buffer.from(h.linkname).subarray(0, 100).toString('latin1');
  parts.push(
    rawHeader(truncName, TYPEFLAG[h.type], h.size > OCTAL_LIMIT(12) ? 0 : h.size, {
      ...h,
      linkname: truncLink,
      uname: fits(h.uname, 32) ? h.uname : '',
      gname: fits(h.gname, 32) ? h.gname : '',
    }),
  );
  return Buffer.concat(parts);
}

function formatPaxTime(sec: number, nsec: number): string {
  const frac = (ns: number) => String(ns).padStart(9, '0').replace(/0+$/, '');
  if (nsec === 0) return String(sec);
  if (sec >= 0) return `${sec}.${frac(nsec)}`;
  return `-${-sec - 1}.${frac(1e9 - nsec)}`;
}

/** Validation helper shared by writers: a header any reader can take back unchanged. */
export function checkHeader(h: TarHeader): void {
  if (!Number.isSafeInteger(h.size) || h.size < 0) throw invalidArgument(`tar entry ${h.path}: bad size`);
  if (!Number.isInteger(h.mtimeNsec) || h.mtimeNsec < 0 || h.mtimeNsec >= 1e9) {
    throw invalidArgument(`tar entry ${h.path}: bad mtime nanoseconds`);
  }
}
