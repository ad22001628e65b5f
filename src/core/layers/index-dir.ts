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
import { Transform, type TransformCallback } from 'node:stream';
import { constants as zc, gunzipSync } from 'node:zlib';
import fs from 'node:fs/promises';
import path from 'node:path';
import { invalidArgument } from '../errors.js';
import { looksLikeIndexLayer } from '../index/index-layer.js';
import { INDEX_MANIFEST_PATH, parseIndexManifest, RESERVED_DIR, type IndexFile, type IndexManifest } from '../index/manifest.js';
import { native } from '../sys/native.js';
import { isOverlayPrivate, listXattrs, getXattr, setXattr } from '../sys/xattr.js';
import type { GearBlobTuple } from '../lazy/catalog.js';

export const METACOPY_XATTR = 'trusted.overlay.metacopy';
export const REDIRECT_XATTR = 'trusted.overlay.redirect';

/** The redirect of a content digest: `/sha256/ab/<hex>`. */
export function redirectOf(digest: string): string {
  const hex = digest.slice('sha256:'.length);
  return `/sha256/${hex.slice(0, 2)}/${hex}`;
}

/**
 * Passes a layer tar through unchanged, keeping its first bytes so that, once
 * extracted, the store can tell whether the tar's first entry was
 * `.gear/index.json` (uncompressed, or gzip-compressed).
 */
export class HeadSniffer extends Transform {
  private readonly chunks: Buffer[] = [];
  private kept = 0;
  constructor(private readonly limit = 64 * 1024) {
    super();
  }
  override _transform(chunk: Buffer, _e: BufferEncoding, cb: TransformCallback): void {
    if (this.kept < this.limit) {
      const part = chunk.subarray(0, this.limit - this.kept);
      this.chunks.push(Buffer.from(part));
      this.kept += part.length;
    }
    cb(null, chunk);
  }
  /** True when the first tar entry is the Gear index manifest. */
  firstEntryIsIndex(): boolean {
    let head = Buffer.concat(this.chunks);
    if (head.length >= 2 && head[0] === 0x1f && head[1] === 0x8b) {
      try {
        head = gunzipSync(head, { finishFlush: zc.Z_SYNC_FLUSH });
      } catch {
        return false;
      }
    }
    return looksLikeIndexLayer(head);
  }
}

/** Reads and validates diff/.gear/index.json (no symlink followed on the way). */
export async function readIndexManifest(diffDir: string): Promise<IndexManifest> {
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

export interface IndexDirResult {
  files: number;
  /** Sum of the real sizes of the manifest's files. */
  bytes: number;
  /** Distinct Gear files: [digest, size, blobDigest?, blobSize?]. */
  blobs: GearBlobTuple[];
}

async function copyMeta(src: string, dst: string, st: import('node:fs').Stats, kind: 'dir' | 'file' | 'symlink' | 'other'): Promise<void> {
  // chown first: it clears security.capability and setuid bits.
  await fs.lchown(dst, st.uid, st.gid);
  for (const name of listXattrs(src)) {
    if (isOverlayPrivate(name)) continue;
    const v = getXattr(src, name);
    if (v !== null) setXattr(dst, name, v);
  }
  if (kind !== 'symlink') await fs.chmod(dst, st.mode & 0o7777);
  await fs.lutimes(dst, st.atime, st.mtime);
}

/**
 * Builds indexDir (must not exist) from the extracted index form in diffDir.
 * Throws InvalidArgument when the tree and the manifest disagree.
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
  const collect = async (rel: string): Promise<void> => {
    const names = (await fs.readdir(path.join(diffDir, rel))).sort();
    for (const name of names) {
      const r = rel ? `${rel}/${name}` : name;
      if (r === RESERVED_DIR) continue;
      const st = await fs.lstat(path.join(diffDir, r));
      ents.push({ rel: r, st });
      if (st.isDirectory()) await collect(r);
    }
  };
  await collect('');
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
  const rootSt = await fs.lstat(diffDir);
  await fs.mkdir(indexDir, { mode: 0o700 });
  await copyMeta(diffDir, indexDir, rootSt, 'dir');
  dirTimes.push([indexDir, rootSt]);
  for (const { rel: r, st } of ents) {
    const src = path.join(diffDir, r);
    const dst = path.join(indexDir, r);
    if (st.isDirectory()) {
      await fs.mkdir(dst, { mode: 0o700 });
      await copyMeta(src, dst, st, 'dir');
      dirTimes.push([dst, st]);
    } else if (st.isSymbolicLink()) {
      await fs.symlink(await fs.readlink(src), dst);
      await copyMeta(src, dst, st, 'symlink');
    } else if (st.isFile()) {
      const key = `${st.dev}:${st.ino}`;
      const first = st.nlink > 1 ? linked.get(key) : undefined;
      if (first !== undefined) {
        await fs.link(first, dst);
        continue;
      }
      if (st.nlink > 1) linked.set(key, dst);
      const f = fileOfInode.get(key);
      const fh = await fs.open(dst, 'wx', 0o600);
      try {
        if (f) await fh.truncate(f.size); // sparse: no data blocks
      } finally {
        await fh.close();
      }
      if (f) {
        setXattr(dst, METACOPY_XATTR, Buffer.alloc(0));
        setXattr(dst, REDIRECT_XATTR, redirectOf(f.digest));
      }
      await copyMeta(src, dst, st, 'file');
    } else {
      // devices, fifos, sockets (and 0/0 whiteouts, meaningless in a base layer): as they are
      native.mknod(dst, st.mode, Math.floor(st.rdev / 256) & 0xfff, (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00));
      await copyMeta(src, dst, st, 'other');
    }
  }
  for (const f of manifest.files) {
    if (!matched.has(f.path)) throw invalidArgument(`gear index layer: manifest lists ${JSON.stringify(f.path)} but the tree has no such empty regular file`);
  }
  // Directory times last: creating entries changed them.
  for (const [dst, st] of dirTimes.reverse()) await fs.lutimes(dst, st.atime, st.mtime);

  const blobs = new Map<string, GearBlobTuple>();
  let bytes = 0;
  for (const f of manifest.files) {
    bytes += f.size;
    if (!blobs.has(f.digest)) blobs.set(f.digest, f.blob ? [f.digest, f.size, f.blob.digest, f.blob.size] : [f.digest, f.size]);
  }
  return { files: manifest.files.length, bytes, blobs: [...blobs.values()] };
}
