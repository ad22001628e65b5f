/**
 * Gear index layers in the layer store (DESIGN.md "How a container sees its
 * files", docs of src/core/index).
 *
 * An index layer is extracted like any layer into layers/<id>/diff (its *index
 * form*: the tree with empty regular files plus .gear/index.json, which is
 * what Get() shows, so Docker's tar-split reassembles the original layer tar
 * byte for byte). From that, buildIndexDir makes layers/<id>/index: the same
 * tree without .gear/, each file of the manifest a sparse file of its real
 * size with the original metadata and the overlay xattrs
 *   trusted.overlay.metacopy = ""            (metadata-only inode)
 *   trusted.overlay.redirect = /sha256/ab/<hex>   (data in ROOT/pool or ROOT/miss)
 * written directly on the underlying filesystem. Layers stacked on an index
 * layer use index/ as their lower.
 *
 * The manifest is hostile input: paths are matched against the tree as it is
 * walked here (never resolved through symlinks), every listed path must be an
 * empty regular file of the tree, and every regular file of the tree must be
 * empty.
 */
import { constants as zc, gunzipSync } from 'node:zlib';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { invalidArgument } from '../errors.js';
import { looksLikeIndexLayer, readIndexLayer } from '../index/index-layer.js';
import { INDEX_MANIFEST_PATH, parseIndexManifest, RESERVED_DIR, type IndexFile, type IndexManifest } from '../index/manifest.js';
import type { TarHeader } from '../index/tar.js';
import { native } from '../sys/native.js';
import { isOverlayPrivate, listXattrs, getXattr, setXattr } from '../sys/xattr.js';
import { entryDevice, entryError, entryMeta, symlinkTarget, METACOPY_XATTR, redirectOf, REDIRECT_XATTR, summarize, type EntryMeta, type IndexDirResult } from './index-entry.js';
import { indexTreeFromEntriesSliced, writeIndexImageSliced } from './index-image.js';

// What both index forms share lives in index-entry.ts; re-exported for the store.
export { METACOPY_XATTR, REDIRECT_XATTR, redirectOf, summarize, type IndexDirResult } from './index-entry.js';

/** True when `head`, the first bytes of a layer tar (plain or gzip), starts with the Gear index manifest. */
export function headIsIndexLayer(head: Buffer): boolean {
  if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) {
    try {
      head = gunzipSync(head, { finishFlush: zc.Z_SYNC_FLUSH });
    } catch {
      return false;
    }
  }
  return looksLikeIndexLayer(head);
}

/**
 * Reads and validates diff/.gear/index.json (no symlink followed on the way).
 * A version 2 manifest carries the tree itself (checked with the manifest),
 * and diff/ must hold nothing but `.gear/`, as a version 2 layer tar does.
 */
export async function readIndexManifest(diffDir: string): Promise<IndexManifest> {
  const manifest = await readManifestFile(diffDir);
  if (manifest.tree) {
    const other = (await fs.readdir(diffDir)).filter((n) => n !== RESERVED_DIR);
    if (other.length) {
      throw invalidArgument(`gear index layer: version ${manifest.version} holds only ${INDEX_MANIFEST_PATH}, but the layer also has ${JSON.stringify(other[0]!.slice(0, 200))}`);
    }
  }
  return manifest;
}

async function readManifestFile(diffDir: string): Promise<IndexManifest> {
  const dir = path.join(diffDir, RESERVED_DIR);
  const dst = await fs.lstat(dir);
  if (!dst.isDirectory()) throw invalidArgument(`gear index layer: ${RESERVED_DIR} is not a directory`);
  const file = path.join(diffDir, INDEX_MANIFEST_PATH);
  const fst = await fs.lstat(file);
  if (!fst.isFile()) throw invalidArgument(`gear index layer: ${INDEX_MANIFEST_PATH} is not a regular file`);
  const fh = await fs.open(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    return parseIndexManifest(await fh.readFile());
  } finally {
    await fh.close();
  }
}

function copyMeta(src: string, dst: string, st: import('node:fs').Stats, kind: 'dir' | 'file' | 'symlink' | 'other'): void {
  // chown first: it clears security.capability and setuid bits.
  fsSync.lchownSync(dst, st.uid, st.gid);
  for (const name of listXattrs(src)) {
    if (isOverlayPrivate(name)) continue;
    const v = getXattr(src, name);
    if (v !== null) setXattr(dst, name, v);
  }
  if (kind !== 'symlink') fsSync.chmodSync(dst, st.mode & 0o7777);
  fsSync.lutimesSync(dst, st.atime, st.mtime);
}

/**
 * Builds indexDir (must not exist) from the extracted index form in diffDir.
 * Throws InvalidArgument when the tree and the manifest disagree. Synchronous
 * calls throughout: thousands of small metadata operations cost far more as
 * libuv round trips than they block (the snapshotter's Commit of a big index).
 */
export async function buildIndexDir(diffDir: string, indexDir: string, manifest: IndexManifest): Promise<IndexDirResult> {
  const listed = new Map<string, IndexFile>(manifest.files.map((f) => [f.path, f]));
  const matched = new Set<string>();
  /** inode of a diff/ file → its path in index/ (hard links) */
  const linked = new Map<string, string>();
  const dirTimes: Array<[string, import('node:fs').Stats]> = [];

  // Pass 1: the tree as it is (lstat only; nothing followed).
  type Ent = { rel: string; st: import('node:fs').Stats };
  const ents: Ent[] = [];
  const collect = (rel: string): void => {
    const names = fsSync.readdirSync(path.join(diffDir, rel)).sort();
    for (const name of names) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === RESERVED_DIR) continue;
      const st = fsSync.lstatSync(path.join(diffDir, r));
      ents.push({ rel: r, st });
      if (st.isDirectory()) collect(r);
    }
  };
  collect('');
  // Which inode carries which Gear file (a hard link may come before the listed path).
  const fileOfInode = new Map<string, IndexFile>();
  for (const { rel, st } of ents) {
    if (!st.isFile()) continue;
    if (st.size !== 0) throw invalidArgument(`gear index layer: regular file ${JSON.stringify(rel)} has content`);
    const f = listed.get(rel);
    if (!f) continue;
    const key = `${st.dev}:${st.ino}`;
    const prev = fileOfInode.get(key);
    if (prev && prev.digest !== f.digest) throw invalidArgument(`gear index layer: hard-linked paths ${JSON.stringify(prev.path)} and ${JSON.stringify(f.path)} list different digests`);
    fileOfInode.set(key, f);
    matched.add(rel);
  }

  // Pass 2: build index/.
  const rootSt = fsSync.lstatSync(diffDir);
  fsSync.mkdirSync(indexDir, { mode: 0o700 });
  copyMeta(diffDir, indexDir, rootSt, 'dir');
  dirTimes.push([indexDir, rootSt]);
  for (const { rel: r, st } of ents) {
    const src = path.join(diffDir, r);
    const dst = path.join(indexDir, r);
    if (st.isDirectory()) {
      fsSync.mkdirSync(dst, { mode: 0o700 });
      copyMeta(src, dst, st, 'dir');
      dirTimes.push([dst, st]);
    } else if (st.isSymbolicLink()) {
      fsSync.symlinkSync(fsSync.readlinkSync(src), dst);
      copyMeta(src, dst, st, 'symlink');
    } else if (st.isFile()) {
      const key = `${st.dev}:${st.ino}`;
      const first = st.nlink > 1 ? linked.get(key) : undefined;
      if (first !== undefined) {
        fsSync.linkSync(first, dst);
        continue;
      }
      if (st.nlink > 1) linked.set(key, dst);
      const f = fileOfInode.get(key);
      const fd = fsSync.openSync(dst, 'wx', 0o600);
      try {
        if (f) fsSync.ftruncateSync(fd, f.size); // sparse: no data blocks
      } finally {
        fsSync.closeSync(fd);
      }
      if (f) {
        setXattr(dst, METACOPY_XATTR, Buffer.alloc(0));
        setXattr(dst, REDIRECT_XATTR, redirectOf(f.digest));
      }
      copyMeta(src, dst, st, 'file');
    } else {
      // devices, fifos, sockets (and 0/0 whiteouts, meaningless in a base layer): as they are
      native.mknod(dst, st.mode, Math.floor(st.rdev / 256) & 0xfff, (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00));
      copyMeta(src, dst, st, 'other');
    }
  }
  for (const f of manifest.files) {
    if (!matched.has(f.path)) throw invalidArgument(`gear index layer: manifest lists ${JSON.stringify(f.path)} but the tree has no such empty regular file`);
  }
  // Directory times last: creating entries changed them.
  for (const [dst, st] of dirTimes.reverse()) fsSync.lutimesSync(dst, st.atime, st.mtime);

  return summarize(manifest);
}

// ---- straight from the tar (ApplyDiff) ------------------------------------------------

/**
 * The layer tar of an index layer, kept in its layer dir: its index form
 * (diff/) is extracted from it only when something asks for that view (Get()
 * of the index layer itself: push, save, diff). A pull never does, so it
 * creates the tree's inodes once (index/), not twice.
 */
export const INDEX_TAR = 'index.tar';

const NEW_FILE = fsSync.constants.O_WRONLY | fsSync.constants.O_CREAT | fsSync.constants.O_EXCL | fsSync.constants.O_NOFOLLOW;

export interface AppliedIndexLayer extends IndexDirResult {
  manifest: IndexManifest;
  /** What ApplyDiff reports, as for any layer: the bytes of regular-file content (the manifest's). */
  size: number;
  /** With `deferImage`: writes the image file (its tree is built and checked already). */
  writeImage?: () => Promise<void>;
}

/**
 * Where applyIndexLayer puts the index: a directory tree, or an EROFS image
 * file (index-image.ts); with `deferImage` the image is written when the
 * caller calls writeImage() (the tree, and every check, come first).
 */
export type IndexTarget = { dir: string } | { image: string; deferImage?: boolean };

/**
 * ApplyDiff of an index layer: reads the (decompressed) tar once, validates
 * it as an index layer (readIndexLayer: clean, sorted, unique paths, no body
 * but the manifest's, manifest and entries agree, hard links to earlier
 * entries), stores its bytes in tarFile and builds the index (target: a dir
 * that must not exist, or an image file) from the entries directly. Throws
 * InvalidArgument for a bad layer.
 */
export async function applyIndexLayer(
  bytes: AsyncIterable<Buffer>,
  target: IndexTarget,
  tarFile: string,
  /** Called with the validated manifest before the rest of the tar is read (the store marks the phase). */
  onManifest?: (manifest: IndexManifest) => void,
): Promise<AppliedIndexLayer> {
  const fd = fsSync.openSync(tarFile, NEW_FILE, 0o600);
  let layer: Awaited<ReturnType<typeof readIndexLayer>>;
  try {
    async function* keep(): AsyncGenerator<Buffer> {
      for await (const chunk of bytes) {
        let done = 0;
        while (done < chunk.length) done += fsSync.writeSync(fd, chunk, done, chunk.length - done);
        yield chunk;
      }
    }
    layer = await readIndexLayer(keep(), undefined, onManifest);
    fsSync.fdatasyncSync(fd);
  } finally {
    fsSync.closeSync(fd);
  }
  let r: IndexDirResult;
  if ('dir' in target) r = buildIndexDirFromEntries(target.dir, layer.manifest, layer.entries);
  else {
    // In slices: the prefetch the manifest started goes on downloading meanwhile.
    const { root, result } = await indexTreeFromEntriesSliced(layer.manifest, layer.entries);
    // The headers are in the tree now: let them go before the image is built (~400 bytes an entry).
    layer.entries = [];
    delete layer.manifest.tree;
    if (target.deferImage) return { ...result, manifest: layer.manifest, size: layer.manifestBytes, writeImage: () => writeIndexImageSliced(target.image, root) };
    await writeIndexImageSliced(target.image, root);
    r = result;
  }
  return { ...r, manifest: layer.manifest, size: layer.manifestBytes };
}

/**
 * Builds indexDir from validated index-layer entries (readIndexLayer), with
 * synchronous calls: a few microseconds each on the page cache, where a trip
 * through libuv's threadpool per call cost more than the call. Nothing is
 * followed: every parent is a directory this function made (a missing one is
 * made 0755, as Docker does), entries only ever create new names.
 */
export function buildIndexDirFromEntries(indexDir: string, manifest: IndexManifest, entries: readonly TarHeader[]): IndexDirResult {
  const listed = new Map<string, IndexFile>(manifest.files.map((f) => [f.path, f]));
  const dirs = new Set<string>(['']);
  const others = new Set<string>();
  const dirTimes: Array<[string, number, number]> = [];
  fsSync.mkdirSync(indexDir, { mode: 0o700 });
  fsSync.chmodSync(indexDir, 0o755);

  const parentOf = (rel: string): string => {
    const parts = rel.split('/');
    let cur = '';
    for (const part of parts.slice(0, -1)) {
      cur = cur ? `${cur}/${part}` : part;
      if (dirs.has(cur)) continue;
      if (others.has(cur)) throw invalidArgument(`gear index layer: entry ${JSON.stringify(rel)}: parent ${JSON.stringify(cur)} is not a directory`);
      fsSync.mkdirSync(path.join(indexDir, cur), 0o755);
      dirs.add(cur);
    }
    return cur;
  };

  for (const h of entries) {
    const rel = h.path.replace(/\/+$/, '');
    try {
      if (rel.split('/').some((c) => c.startsWith('.wh.'))) {
        throw invalidArgument('whiteouts have no place in an index layer');
      }
      parentOf(rel);
      const abs = path.join(indexDir, rel);
      const m = entryMeta(h);
      switch (h.type) {
        case 'dir':
          fsSync.mkdirSync(abs, 0o700);
          dirs.add(rel);
          setMeta(abs, m);
          dirTimes.push([abs, m.atime, m.mtime]);
          continue;
        case 'file': {
          others.add(rel);
          const f = listed.get(rel);
          const fd = fsSync.openSync(abs, NEW_FILE, 0o600);
          try {
            if (f) {
              fsSync.ftruncateSync(fd, f.size); // sparse: no data blocks
              setXattr(abs, METACOPY_XATTR, Buffer.alloc(0));
              setXattr(abs, REDIRECT_XATTR, redirectOf(f.digest));
            }
            // chown first: it clears security.capability and setuid bits.
            fsSync.fchownSync(fd, m.uid, m.gid);
            for (const [n, v] of m.xattrs) setXattr(abs, n, v);
            fsSync.fchmodSync(fd, m.mode);
            fsSync.futimesSync(fd, m.atime, m.mtime);
          } finally {
            fsSync.closeSync(fd);
          }
          continue;
        }
        case 'symlink':
          others.add(rel);
          fsSync.symlinkSync(symlinkTarget(h), abs);
          fsSync.lchownSync(abs, m.uid, m.gid);
          for (const [n, v] of m.xattrs) setXattr(abs, n, v);
          fsSync.lutimesSync(abs, m.atime, m.mtime);
          continue;
        case 'link':
          // readIndexLayer checked: an earlier non-directory entry of this layer.
          others.add(rel);
          fsSync.linkSync(path.join(indexDir, h.linkname.replace(/\/+$/, '')), abs);
          continue;
        default: {
          // char, block, fifo
          others.add(rel);
          const fmt = h.type === 'char' ? fsSync.constants.S_IFCHR : h.type === 'block' ? fsSync.constants.S_IFBLK : fsSync.constants.S_IFIFO;
          const { major, minor } = h.type === 'fifo' ? { major: 0, minor: 0 } : entryDevice(h);
          native.mknod(abs, fmt | (m.mode & 0o777), major, minor);
          setMeta(abs, m);
          fsSync.lutimesSync(abs, m.atime, m.mtime);
        }
      }
    } catch (err) {
      throw entryError(rel, err);
    }
  }
  // Directory times last (creating entries changed them), deepest first.
  for (let i = dirTimes.length - 1; i >= 0; i--) {
    const [dir, atime, mtime] = dirTimes[i]!;
    fsSync.lutimesSync(dir, atime, mtime);
  }
  return summarize(manifest);
}

/** Owner, xattrs, mode, in that order (chown clears setuid bits and capabilities). */
function setMeta(abs: string, m: EntryMeta): void {
  fsSync.lchownSync(abs, m.uid, m.gid);
  for (const [n, v] of m.xattrs) setXattr(abs, n, v);
  fsSync.chmodSync(abs, m.mode);
}

