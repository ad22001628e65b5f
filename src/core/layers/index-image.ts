/**
 * The index of a Gear layer as one EROFS image (erofs-image.ts) instead of a
 * directory tree (index-dir.ts): layers/<id>/index.erofs, mounted read-only at
 * layers/<id>/index, where overlay finds the same metacopy tree it would find
 * in the directory form. A pull then writes one file of about 200 bytes per
 * entry instead of creating one inode per entry, which is what made a
 * 5,000-file index take seconds on ext4.
 *
 * Needs file-backed EROFS mounts (Linux 6.12+, CONFIG_EROFS_FS_BACKED_BY_FILE);
 * probeIndexImages() tells whether this kernel has them, and the store falls
 * back to the directory form when it has not.
 */
import fsSync from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { invalidArgument } from '../errors.js';
import type { IndexFile, IndexManifest } from '../index/manifest.js';
import type { TarHeader } from '../index/tar.js';
import { constants, native } from '../sys/native.js';
import { buildErofsImage, buildErofsImageSliced, EROFS_MAX_FILE_BYTES, xattrAreaSize, type ErofsNode } from './erofs-image.js';
import { runSliced, runSync, type Steps } from './slices.js';
import { RESERVED_DIR } from '../index/manifest.js';
import { getXattr, isOverlayPrivate, listXattrs } from '../sys/xattr.js';
import { entryDevice, entryError, entryMeta, symlinkTarget, METACOPY_XATTR, redirectOf, REDIRECT_XATTR, summarize, type IndexDirResult } from './index-entry.js';

/** The image file of an index layer, in its layer dir. */
export const INDEX_IMAGE = 'index.erofs';

const dirNode = (mode: number, uid: number, gid: number, mtime: number): ErofsNode => ({
  type: 'dir',
  mode,
  uid,
  gid,
  mtimeSec: Math.floor(mtime),
  mtimeNsec: Math.round((mtime % 1) * 1e9),
  xattrs: [],
  children: new Map(),
});

/**
 * The tree of validated index-layer entries (readIndexLayer), with the same
 * rules as buildIndexDirFromEntries: no whiteouts, a parent must be a
 * directory (a missing one is made 0755, as Docker does), a name is created
 * once, hard links point to earlier entries.
 */
export function indexTreeFromEntries(manifest: IndexManifest, entries: readonly TarHeader[]): IndexTree {
  return runSync(indexTreeSteps(manifest, entries));
}

/** indexTreeFromEntries in slices (slices.ts): the event loop runs between them. */
export function indexTreeFromEntriesSliced(manifest: IndexManifest, entries: readonly TarHeader[]): Promise<IndexTree> {
  return runSliced(indexTreeSteps(manifest, entries));
}

export interface IndexTree {
  root: ErofsNode;
  result: IndexDirResult;
}

function* indexTreeSteps(manifest: IndexManifest, entries: readonly TarHeader[]): Steps<IndexTree> {
  const listed = new Map<string, IndexFile>(manifest.files.map((f) => [f.path, f]));
  const now = Date.now() / 1000;
  const root = dirNode(0o755, 0, 0, now);
  const nodes = new Map<string, ErofsNode>([['', root]]);

  /** The directory node of rel's parent; missing parents are made 0755 (as Docker does). */
  const parentOf = (rel: string, slash: number): ErofsNode => {
    if (slash < 0) return root;
    const known = nodes.get(rel.slice(0, slash));
    if (known) {
      if (known.type !== 'dir') throw invalidArgument(`gear index layer: entry ${JSON.stringify(rel)}: parent ${JSON.stringify(rel.slice(0, slash))} is not a directory`);
      return known;
    }
    let cur = '';
    let node = root;
    for (const part of rel.slice(0, slash).split('/')) {
      cur = cur ? `${cur}/${part}` : part;
      let next = nodes.get(cur);
      if (!next) {
        next = dirNode(0o755, 0, 0, now);
        nodes.set(cur, next);
        node.children!.set(part, next);
      } else if (next.type !== 'dir') {
        throw invalidArgument(`gear index layer: entry ${JSON.stringify(rel)}: parent ${JSON.stringify(cur)} is not a directory`);
      }
      node = next;
    }
    return node;
  };

  const metacopy = Buffer.alloc(0);
  let n = 0;
  for (const h of entries) {
    if (++n % 512 === 0) yield;
    const rel = h.path.endsWith('/') ? h.path.replace(/\/+$/, '') : h.path;
    try {
      for (const c of rel.split('/')) {
        if (c === '' || c === '.' || c === '..') throw invalidArgument('not a clean relative path');
        if (c.startsWith('.wh.')) throw invalidArgument('whiteouts have no place in an index layer');
      }
      const slash = rel.lastIndexOf('/');
      const parent = parentOf(rel, slash);
      if (nodes.has(rel)) throw Object.assign(new Error(`${rel}: already exists`), { code: 'EEXIST' });
      const m = entryMeta(h);
      const mtimeSec = Math.floor(m.mtime);
      const mtimeNsec = Math.round((m.mtime - mtimeSec) * 1e9);
      let node: ErofsNode;
      switch (h.type) {
        case 'dir':
          node = { type: 'dir', mode: m.mode, uid: m.uid, gid: m.gid, mtimeSec, mtimeNsec, xattrs: m.xattrs, children: new Map() };
          break;
        case 'file': {
          const f = listed.get(rel);
          if (f && f.size > EROFS_MAX_FILE_BYTES) {
            throw invalidArgument(`a file of ${f.size} bytes is beyond ${EROFS_MAX_FILE_BYTES} (8 TiB), the largest an EROFS index stores (GEAR_INDEX_FORM=dir takes what the filesystem under the gear root takes)`);
          }
          node = { type: 'file', mode: m.mode, uid: m.uid, gid: m.gid, mtimeSec, mtimeNsec, xattrs: m.xattrs, size: f ? f.size : 0 };
          if (f) node.xattrs = [[METACOPY_XATTR, metacopy], [REDIRECT_XATTR, Buffer.from(redirectOf(f.digest))], ...m.xattrs];
          break;
        }
        case 'symlink':
          node = { type: 'symlink', mode: 0o777, uid: m.uid, gid: m.gid, mtimeSec, mtimeNsec, xattrs: m.xattrs, target: symlinkTarget(h) };
          break;
        case 'link': {
          // readIndexLayer checked: an earlier non-directory entry of this layer.
          const target = nodes.get(h.linkname.replace(/\/+$/, ''));
          if (!target || target.type === 'dir') throw invalidArgument(`hard link to ${JSON.stringify(h.linkname.slice(0, 200))}, which is not an earlier file`);
          node = target;
          break;
        }
        default: {
          const { major, minor } = h.type === 'fifo' ? { major: 0, minor: 0 } : entryDevice(h);
          const type = h.type === 'char' ? 'char' : h.type === 'block' ? 'block' : h.type === 'fifo' ? 'fifo' : undefined;
          if (!type) throw invalidArgument(`entry type ${JSON.stringify(h.type)} has no place in an index layer`);
          node = { type, mode: m.mode, uid: m.uid, gid: m.gid, mtimeSec, mtimeNsec, xattrs: m.xattrs, major, minor };
        }
      }
      if (h.type !== 'link') xattrAreaSize(node.xattrs); // what EROFS cannot store is refused here, naming the entry
      nodes.set(rel, node);
      parent.children!.set(slash < 0 ? rel : rel.slice(slash + 1), node);
    } catch (err) {
      throw entryError(rel, err);
    }
  }
  return { root, result: summarize(manifest) };
}

/** Writes the image of root to file (temp name, fsync, rename). */
export function writeIndexImage(file: string, root: ErofsNode): void {
  writeImageFile(file, buildErofsImage(root));
}

/** writeIndexImage with the image built in slices (slices.ts): the event loop runs between them. */
export async function writeIndexImageSliced(file: string, root: ErofsNode): Promise<void> {
  writeImageFile(file, await buildErofsImageSliced(root));
}

function writeImageFile(file: string, img: Buffer): void {
  const tmp = `${file}.tmp-${randomBytes(4).toString('hex')}`;
  const fd = fsSync.openSync(tmp, fsSync.constants.O_WRONLY | fsSync.constants.O_CREAT | fsSync.constants.O_EXCL, 0o600);
  try {
    let done = 0;
    while (done < img.length) done += fsSync.writeSync(fd, img, done, img.length - done);
    fsSync.fdatasyncSync(fd);
  } catch (err) {
    fsSync.closeSync(fd);
    fsSync.rmSync(tmp, { force: true });
    throw err;
  }
  fsSync.closeSync(fd);
  fsSync.renameSync(tmp, file);
}

/** Mounts an index image read-only at dir (made if missing). */
export function mountIndexImage(image: string, dir: string): void {
  fsSync.mkdirSync(dir, { recursive: true, mode: 0o755 });
  native.mount(image, dir, 'erofs', constants.MS_RDONLY, '');
}

/**
 * Whether this kernel mounts EROFS image files (tried in scratch, under
 * root): undefined when it does, else why not.
 */
export function probeIndexImages(scratch: string): string | undefined {
  const dir = path.join(scratch, `.erofs-probe-${randomBytes(4).toString('hex')}`);
  fsSync.mkdirSync(dir, { recursive: true, mode: 0o700 });
  try {
    const image = path.join(dir, 'probe.erofs');
    const mnt = path.join(dir, 'mnt');
    const root = dirNode(0o755, 0, 0, 0);
    root.children!.set('f', { type: 'file', mode: 0o644, uid: 0, gid: 0, mtimeSec: 0, mtimeNsec: 0, size: 1, xattrs: [[METACOPY_XATTR, Buffer.alloc(0)]] });
    writeIndexImage(image, root);
    try {
      mountIndexImage(image, mnt);
    } catch (err) {
      return (err as Error).message;
    }
    try {
      const st = fsSync.statSync(path.join(mnt, 'f'));
      if (st.size !== 1) return 'a probe image mounted but showed the wrong size';
    } finally {
      native.umount2(mnt, constants.MNT_DETACH);
    }
    return undefined;
  } catch (err) {
    return (err as Error).message;
  } finally {
    fsSync.rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The tree of an index form extracted by someone else (the snapshotter's
 * Commit: containerd's unpacker wrote diffDir), with buildIndexDir's rules:
 * nothing is followed (lstat only), every listed path must be an empty
 * regular file of the tree, every regular file must be empty, hard links
 * (same inode) must list the same digest. `.gear/` is left out.
 */
export function indexTreeFromDir(diffDir: string, manifest: IndexManifest): { root: ErofsNode; result: IndexDirResult } {
  const listed = new Map<string, IndexFile>(manifest.files.map((f) => [f.path, f]));
  const matched = new Set<string>();
  const byInode = new Map<string, ErofsNode>();
  const fileOfInode = new Map<string, IndexFile>();
  const meta = (abs: string, st: fsSync.BigIntStats): Pick<ErofsNode, 'mode' | 'uid' | 'gid' | 'mtimeSec' | 'mtimeNsec' | 'xattrs'> => {
    const xattrs: Array<[string, Buffer]> = [];
    for (const name of listXattrs(abs)) {
      if (isOverlayPrivate(name)) continue;
      const v = getXattr(abs, name);
      if (v !== null) xattrs.push([name, v]);
    }
    const ns = st.mtimeNs;
    return { mode: Number(st.mode) & 0o7777, uid: Number(st.uid), gid: Number(st.gid), mtimeSec: Number(ns / 1_000_000_000n), mtimeNsec: Number(ns % 1_000_000_000n), xattrs };
  };
  const walk = (rel: string, dirNodeOut: ErofsNode): void => {
    for (const name of fsSync.readdirSync(path.join(diffDir, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === RESERVED_DIR) continue;
      const abs = path.join(diffDir, r);
      const st = fsSync.lstatSync(abs, { bigint: true });
      const key = `${st.dev}:${st.ino}`;
      let node: ErofsNode | undefined;
      if (st.isDirectory()) {
        node = { type: 'dir', ...meta(abs, st), children: new Map() };
        dirNodeOut.children!.set(name, node);
        walk(r, node);
        continue;
      }
      if (st.isFile()) {
        if (st.size !== 0n) throw invalidArgument(`gear index layer: regular file ${JSON.stringify(r)} has content`);
        const f = listed.get(r);
        if (f) {
          const prev = fileOfInode.get(key);
          if (prev && prev.digest !== f.digest) throw invalidArgument(`gear index layer: hard-linked paths ${JSON.stringify(prev.path)} and ${JSON.stringify(f.path)} list different digests`);
          fileOfInode.set(key, f);
          matched.add(r);
        }
        node = st.nlink > 1n ? byInode.get(key) : undefined;
        if (!node) {
          node = { type: 'file', ...meta(abs, st), size: 0 };
          if (st.nlink > 1n) byInode.set(key, node);
        }
      } else if (st.isSymbolicLink()) {
        node = { type: 'symlink', ...meta(abs, st), mode: 0o777, target: fsSync.readlinkSync(abs) };
      } else {
        const rdev = Number(st.rdev);
        const type = st.isCharacterDevice() ? 'char' : st.isBlockDevice() ? 'block' : st.isFIFO() ? 'fifo' : st.isSocket() ? 'socket' : undefined;
        if (!type) throw invalidArgument(`gear index layer: ${JSON.stringify(r)} has an unknown file type`);
        node = { type, ...meta(abs, st), major: Math.floor(rdev / 256) & 0xfff, minor: (rdev & 0xff) | ((rdev >> 12) & 0xfff00) };
      }
      dirNodeOut.children!.set(name, node);
    }
  };
  const rootSt = fsSync.lstatSync(diffDir, { bigint: true });
  const root: ErofsNode = { type: 'dir', ...meta(diffDir, rootSt), children: new Map() };
  walk('', root);
  for (const f of manifest.files) {
    if (!matched.has(f.path)) throw invalidArgument(`gear index layer: manifest lists ${JSON.stringify(f.path)} but the tree has no such empty regular file`);
  }
  // Listed files become metacopy files of their real size (every link of an inode: one node).
  const applied = new Set<ErofsNode>();
  const mark = (node: ErofsNode, rel: string): void => {
    if (node.type === 'dir') {
      for (const [name, child] of node.children!) mark(child, rel ? `${rel}/${name}` : name);
      return;
    }
    const f = listed.get(rel);
    if (node.type !== 'file' || !f || applied.has(node)) return;
    applied.add(node);
    node.size = f.size;
    node.xattrs = [[METACOPY_XATTR, Buffer.alloc(0)], [REDIRECT_XATTR, Buffer.from(redirectOf(f.digest))], ...node.xattrs];
  };
  mark(root, '');
  return { root, result: summarize(manifest) };
}

