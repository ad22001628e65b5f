/**
 * A writer of EROFS images that hold metadata only: the index of a Gear
 * layer as one file instead of one inode per file (DESIGN.md "How a
 * container sees its files"; composefs builds the same kind of image).
 *
 * The kernel mounts the image file directly (file-backed EROFS, Linux 6.12+)
 * and overlayfs takes it as a lower layer: regular files carry
 * trusted.overlay.metacopy and trusted.overlay.redirect, so their data comes
 * from the data-only layers (pool, miss filesystem), never from the image.
 * Their own data is a hole: chunk-based layout with one null chunk, so a read
 * through the image itself returns zeros.
 *
 * Layout (block size 4096): block 0 holds the superblock at byte 1024; the
 * metadata area starts at block 1 and holds every inode (always the 64-byte
 * extended form: uid, gid and mtime kept exactly) with its inline xattrs and
 * either its chunk table or its data inline (directories and symlinks whose
 * data fits in the inode's block); data that does not fit goes to whole
 * blocks after the metadata area. The root inode is first (the superblock's
 * root_nid is 16 bits). No inode record crosses a block boundary unless it is
 * bigger than a block (only possible with huge xattrs; the kernel reads such
 * records across blocks).
 *
 * On-disk format: linux/fs/erofs/erofs_fs.h. Pure logic: the caller mounts.
 */
import { invalidArgument } from '../errors.js';
import { comparePaths } from '../index/manifest.js';
import { runSliced, runSync, type Steps } from './slices.js';

export type ErofsNodeType = 'dir' | 'file' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket';

export interface ErofsNode {
  type: ErofsNodeType;
  /** Permission bits (0o7777). */
  mode: number;
  uid: number;
  gid: number;
  mtimeSec: number;
  mtimeNsec: number;
  /** Regular file: its logical size (the data lives elsewhere). */
  size?: number;
  /** Symlink: its target. */
  target?: string;
  /** Devices. */
  major?: number;
  minor?: number;
  xattrs: Array<[string, Buffer]>;
  /** Directory: its entries by name (no "." or ".."). A node listed twice is a hard link. */
  children?: Map<string, ErofsNode>;
}

export const EROFS_MAGIC = 0xe0f5e1e2;
const SUPER_OFFSET = 1024;
const BLKBITS = 12;
const BLKSZ = 1 << BLKBITS;
const META_BLKADDR = 1;
const INODE_SLOT = 32;
const INODE_EXTENDED_SIZE = 64;
const XATTR_IBODY_HEADER = 12;
const DIRENT_SIZE = 12;
const NULL_ADDR = 0xffffffff;
const FEATURE_INCOMPAT_CHUNKED_FILE = 0x4;
const CHUNK_FORMAT_BLKBITS_MASK = 0x1f;

const LAYOUT_FLAT_PLAIN = 0;
const LAYOUT_FLAT_INLINE = 2;
const LAYOUT_CHUNK_BASED = 4;

const S_IF: Record<ErofsNodeType, number> = {
  dir: 0o040000,
  file: 0o100000,
  symlink: 0o120000,
  char: 0o020000,
  block: 0o060000,
  fifo: 0o010000,
  socket: 0o140000,
};
const FILE_TYPE: Record<ErofsNodeType, number> = { file: 1, dir: 2, char: 3, block: 4, fifo: 5, socket: 6, symlink: 7 };

/** POSIX ACLs: stored under their index with an empty name. */
const XATTR_ACLS: Record<string, number> = { 'system.posix_acl_access': 2, 'system.posix_acl_default': 3 };
/** xattr name prefixes EROFS stores as an index (erofs_fs.h EROFS_XATTR_INDEX_*); longest first. */
const XATTR_PREFIXES: Array<[string, number]> = [
  ['security.', 6],
  ['trusted.', 4],
  ['lustre.', 5],
  ['user.', 1],
];

interface Placed {
  node: ErofsNode;
  nid: number;
  nlink: number;
  /** bytes of the inline xattr area (header + entries), 0 when none */
  xattrSize: number;
  /** bytes of directory or symlink data; 0 for the others */
  dataSize: number;
  layout: number;
  /** bytes of the record in the metadata area: inode + xattrs + (chunk table | inline data) */
  recordSize: number;
  /** first data block (FLAT_PLAIN with data) */
  blkaddr: number;
  /** chunk-based: log2 of the chunk size minus BLKBITS */
  chunkFormat: number;
  parent: Placed | null;
}

const align = (n: number, a: number): number => Math.ceil(n / a) * a;

/** Writes a non-negative integer below 2^53 as 64-bit little endian. */
function writeU64(img: Buffer, v: number, at: number): void {
  img.writeUInt32LE(v % 0x100000000, at);
  img.writeUInt32LE(Math.floor(v / 0x100000000), at + 4);
}

/** The EROFS index and stored name length of an xattr name; throws when EROFS cannot store it. */
function xattrKey(name: string): [index: number, prefixLength: number] {
  const acl = XATTR_ACLS[name];
  if (acl !== undefined) return [acl, name.length];
  for (const [prefix, index] of XATTR_PREFIXES) if (name.length > prefix.length && name.startsWith(prefix)) return [index, prefix.length];
  throw invalidArgument(`xattr ${JSON.stringify(name.slice(0, 100))}: EROFS stores only security.*, trusted.*, user.*, lustre.* and the POSIX ACLs`);
}

/** Largest regular file an image holds: one null chunk of at most 2^(12+31) bytes. */
export const EROFS_MAX_FILE_BYTES = 2 ** (BLKBITS + CHUNK_FORMAT_BLKBITS_MASK);

/** Largest xattr value EROFS stores (e_value_size is 16 bits; Linux allows one byte more). */
export const EROFS_XATTR_VALUE_MAX = 0xffff;

/**
 * Bytes of the inline xattr area for these xattrs (0 for none); throws
 * InvalidArgument naming the xattr and the rule when EROFS cannot store one
 * (callers call it per entry, so the error can name the entry too).
 */
export function xattrAreaSize(xattrs: ReadonlyArray<[string, Buffer]>): number {
  if (xattrs.length === 0) return 0;
  let size = XATTR_IBODY_HEADER;
  for (const [name, value] of xattrs) {
    const [, plen] = xattrKey(name);
    const suffixLen = Buffer.byteLength(name) - plen; // prefixes are ASCII
    if (suffixLen > 255) throw invalidArgument(`xattr ${JSON.stringify(name.slice(0, 100))}: the name after its namespace is ${suffixLen} bytes, beyond the 255 EROFS stores`);
    if (value.length > EROFS_XATTR_VALUE_MAX) {
      throw invalidArgument(`xattr ${JSON.stringify(name.slice(0, 100))}: a value of ${value.length} bytes is beyond ${EROFS_XATTR_VALUE_MAX}, the largest EROFS stores`);
    }
    size += align(4 + suffixLen + value.length, 4);
  }
  if ((size - XATTR_IBODY_HEADER) / 4 + 1 > 0xffff) throw invalidArgument(`the xattrs take ${size} bytes, beyond the ${(0xffff - 1) * 4 + XATTR_IBODY_HEADER} one EROFS inode holds`);
  return size;
}

/** Writes the inline xattr area at `at` (the image is zero-filled: header and padding stay zero). */
function writeXattrArea(img: Buffer, at: number, xattrs: ReadonlyArray<[string, Buffer]>): void {
  let o = at + XATTR_IBODY_HEADER;
  for (const [name, value] of xattrs) {
    const [index, plen] = xattrKey(name);
    const suffixLen = img.write(name.slice(plen), o + 4, 'utf8');
    img[o] = suffixLen;
    img[o + 1] = index;
    img[o + 2] = value.length & 0xff;
    img[o + 3] = value.length >>> 8;
    value.copy(img, o + 4 + suffixLen);
    o += align(4 + suffixLen + value.length, 4);
  }
}

interface DirEntry {
  name: string;
  /** UTF-8 bytes of name */
  len: number;
  child: Placed;
}

/** Sorted entries of a directory, "." and ".." included, as EROFS orders them (bytewise). */
function dirEntries(p: Placed, placedOf: Map<ErofsNode, Placed>): DirEntry[] {
  const out: DirEntry[] = [
    { name: '.', len: 1, child: p },
    { name: '..', len: 2, child: p.parent ?? p },
  ];
  for (const [name, node] of p.node.children ?? new Map<string, ErofsNode>()) out.push({ name, len: Buffer.byteLength(name), child: placedOf.get(node)! });
  return out.sort((a, b) => comparePaths(a.name, b.name)); // names hold no '/': bytewise
}

/** Splits a directory's sorted entries into blocks (each ≤ BLKSZ bytes). nids are filled in later. */
function dirBlocks(ents: DirEntry[]): DirEntry[][] {
  const blocks: DirEntry[][] = [];
  let cur: DirEntry[] = [];
  let used = 0;
  for (const e of ents) {
    if (e.len === 0 || e.len > 255) throw invalidArgument(`entry name of ${e.len} bytes`);
    const need = DIRENT_SIZE + e.len;
    if (used + need > BLKSZ) {
      blocks.push(cur);
      cur = [];
      used = 0;
    }
    cur.push(e);
    used += need;
  }
  if (cur.length) blocks.push(cur);
  return blocks;
}

/** Writes one directory block at `at`: the dirents, then the names. */
function writeDirBlock(img: Buffer, at: number, block: DirEntry[]): void {
  let nameoff = block.length * DIRENT_SIZE;
  for (let i = 0; i < block.length; i++) {
    const e = block[i]!;
    const o = at + i * DIRENT_SIZE;
    img.writeUInt32LE(e.child.nid >>> 0, o); // nid: 64-bit little endian, high word zero
    img.writeUInt16LE(nameoff, o + 8);
    img[o + 10] = FILE_TYPE[e.child.node.type];
    img.write(e.name, at + nameoff, 'utf8');
    nameoff += e.len;
  }
}

/** Bytes of directory data: full blocks zero-padded, the last one exact. */
function dirDataSize(blocks: DirEntry[][]): number {
  const last = blocks[blocks.length - 1]!;
  return (blocks.length - 1) * BLKSZ + last.reduce((n, e) => n + DIRENT_SIZE + e.len, 0);
}

/**
 * Builds the image of the tree under root. Node values are validated here
 * only as far as the format needs (the caller validated the layer).
 */
export function buildErofsImage(root: ErofsNode, buildTimeSec = 0): Buffer {
  return runSync(erofsImageSteps(root, buildTimeSec));
}

/** buildErofsImage in slices (slices.ts): the event loop runs between them. */
export function buildErofsImageSliced(root: ErofsNode, buildTimeSec = 0): Promise<Buffer> {
  return runSliced(erofsImageSteps(root, buildTimeSec));
}

/** How many nodes a step handles between yields. */
const STEP = 512;

function* erofsImageSteps(root: ErofsNode, buildTimeSec: number): Steps<Buffer> {
  if (root.type !== 'dir') throw invalidArgument('the root of an EROFS image must be a directory');
  // 1. Every distinct node once, parents first (breadth-first keeps a directory's children close).
  const placedOf = new Map<ErofsNode, Placed>();
  const order: Placed[] = [];
  const visit = (node: ErofsNode, parent: Placed | null): Placed => {
    let p = placedOf.get(node);
    if (p) {
      if (node.type === 'dir') throw invalidArgument('a directory cannot be hard-linked');
      p.nlink++;
      return p;
    }
    p = { node, nid: 0, nlink: 1, xattrSize: xattrAreaSize(node.xattrs), dataSize: 0, layout: LAYOUT_FLAT_PLAIN, recordSize: 0, blkaddr: 0, chunkFormat: 0, parent };
    placedOf.set(node, p);
    order.push(p);
    return p;
  };
  visit(root, null).nlink = 2;
  for (let i = 0; i < order.length; i++) {
    if (i % STEP === STEP - 1) yield;
    const p = order[i]!;
    if (p.node.type !== 'dir') continue;
    for (const child of p.node.children?.values() ?? []) {
      const c = visit(child, p);
      if (child.type === 'dir') {
        c.nlink = 2;
        p.nlink++;
      }
    }
  }
  if (order.length > 0xffffffff) throw invalidArgument('too many inodes');

  // 2. Sizes and layouts (nids are not needed yet: only names size a directory).
  const dirs = new Map<Placed, DirEntry[][]>();
  let n = 0;
  for (const p of order) {
    if (++n % STEP === 0) yield;
    const base = INODE_EXTENDED_SIZE + p.xattrSize;
    const { node } = p;
    let dataSize = 0;
    if (node.type === 'dir') {
      const blocks = dirBlocks(dirEntries(p, placedOf));
      dirs.set(p, blocks);
      dataSize = dirDataSize(blocks);
    } else if (node.type === 'symlink') {
      dataSize = Buffer.byteLength(node.target ?? '');
      if (dataSize === 0 || dataSize >= BLKSZ) throw invalidArgument(`symlink target of ${dataSize} bytes`);
    }
    p.dataSize = dataSize;
    if (node.type === 'file' && (node.size ?? 0) > 0) {
      const size = node.size!;
      let bits = BLKBITS;
      while (bits < 63 && 2 ** bits < size) bits++;
      if (bits - BLKBITS > CHUNK_FORMAT_BLKBITS_MASK) throw invalidArgument(`a file of ${size} bytes is beyond ${EROFS_MAX_FILE_BYTES}, the largest this EROFS index stores (one chunk of 2^43 bytes)`);
      p.layout = LAYOUT_CHUNK_BASED;
      p.chunkFormat = bits - BLKBITS;
      p.recordSize = align(base, 4) + 4; // one block-map entry
    } else if (dataSize > 0 && base + dataSize <= BLKSZ) {
      p.layout = LAYOUT_FLAT_INLINE;
      p.recordSize = base + dataSize;
    } else {
      p.layout = LAYOUT_FLAT_PLAIN;
      p.recordSize = base;
    }
  }

  // 3. nids: records in order, none crossing a block boundary when it fits in one.
  let off = 0;
  for (const p of order) {
    const rem = BLKSZ - (off % BLKSZ);
    if (p.recordSize <= BLKSZ && p.recordSize > rem) off += rem;
    p.nid = off / INODE_SLOT;
    off = align(off + p.recordSize, INODE_SLOT);
  }
  if (order[0]!.nid !== 0) throw new Error('erofs: root nid must be 0');
  const metaBlocks = Math.ceil(off / BLKSZ);

  // 4. Data blocks of plain directories and symlinks after the metadata area.
  let nextBlk = META_BLKADDR + metaBlocks;
  for (const p of order) {
    if (p.layout === LAYOUT_FLAT_PLAIN && p.dataSize > 0) {
      p.blkaddr = nextBlk;
      nextBlk += Math.ceil(p.dataSize / BLKSZ);
    }
  }
  const totalBlocks = nextBlk;
  const img = Buffer.alloc(totalBlocks * BLKSZ);

  // 5. Superblock.
  const sb = SUPER_OFFSET;
  img.writeUInt32LE(EROFS_MAGIC, sb + 0);
  img.writeUInt32LE(0, sb + 4); // checksum (feature SB_CHKSUM not set)
  img.writeUInt32LE(0, sb + 8); // feature_compat
  img.writeUInt8(BLKBITS, sb + 12);
  img.writeUInt8(0, sb + 13); // sb_extslots
  img.writeUInt16LE(order[0]!.nid, sb + 14); // root_nid
  img.writeBigUInt64LE(BigInt(order.length), sb + 16); // inos
  img.writeBigUInt64LE(BigInt(Math.max(0, Math.floor(buildTimeSec))), sb + 24);
  img.writeUInt32LE(0, sb + 32); // build_time_nsec
  img.writeUInt32LE(totalBlocks, sb + 36); // blocks
  img.writeUInt32LE(META_BLKADDR, sb + 40);
  img.writeUInt32LE(0, sb + 44); // xattr_blkaddr: no shared xattrs
  img.write('gear-index', sb + 64, 16, 'latin1'); // volume_name (uuid stays zero)
  img.writeUInt32LE(FEATURE_INCOMPAT_CHUNKED_FILE, sb + 80);

  // 6. Inodes.
  const metaBase = META_BLKADDR * BLKSZ;
  for (let i = 0; i < order.length; i++) {
    if (i % STEP === STEP - 1) yield;
    const p = order[i]!;
    const o = metaBase + p.nid * INODE_SLOT;
    const { node } = p;
    const size = node.type === 'file' ? node.size ?? 0 : p.dataSize;
    img.writeUInt16LE(1 | (p.layout << 1), o + 0); // i_format: extended, layout
    img.writeUInt16LE(p.xattrSize ? (p.xattrSize - XATTR_IBODY_HEADER) / 4 + 1 : 0, o + 2);
    img.writeUInt16LE(S_IF[node.type] | (node.mode & 0o7777), o + 4);
    writeU64(img, size, o + 8);
    let iu = 0;
    if (p.layout === LAYOUT_CHUNK_BASED) iu = p.chunkFormat; // block-map entries (no EROFS_CHUNK_FORMAT_INDEXES)
    else if (node.type === 'char' || node.type === 'block') {
      const major = node.major ?? 0;
      const minor = node.minor ?? 0;
      iu = ((minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)) >>> 0; // new_encode_dev
    } else if (p.layout === LAYOUT_FLAT_PLAIN && p.dataSize > 0) iu = p.blkaddr;
    img.writeUInt32LE(iu, o + 16);
    img.writeUInt32LE((i + 1) >>> 0, o + 20); // i_ino (32-bit stat compatibility)
    img.writeUInt32LE(node.uid >>> 0, o + 24);
    img.writeUInt32LE(node.gid >>> 0, o + 28);
    writeU64(img, Math.max(0, Math.floor(node.mtimeSec)), o + 32);
    img.writeUInt32LE(Math.max(0, Math.min(999_999_999, Math.floor(node.mtimeNsec))), o + 40);
    img.writeUInt32LE(p.nlink, o + 44);
    if (p.xattrSize) writeXattrArea(img, o + INODE_EXTENDED_SIZE, node.xattrs);
    const after = o + INODE_EXTENDED_SIZE + p.xattrSize;
    if (p.layout === LAYOUT_CHUNK_BASED) {
      img.writeUInt32LE(NULL_ADDR, align(after, 4));
      continue;
    }
    // Directory and symlink data: inline after the inode, or in its own blocks.
    const at = p.layout === LAYOUT_FLAT_INLINE ? after : p.blkaddr * BLKSZ;
    if (node.type === 'dir') dirs.get(p)!.forEach((block, b) => writeDirBlock(img, at + b * BLKSZ, block));
    else if (node.type === 'symlink') img.write(node.target!, at, 'utf8');
  }
  return img;
}
