/**
 * The upper dir of an overlay mount as Docker's overlay2 driver would have
 * left it, walked in Docker's order.
 *
 * overlay2 on this machine runs without redirect_dir and metacopy, so its
 * "native diff" just walks the upper dir: every changed file is there with
 * its full content, a renamed lower directory is a copy plus a whiteout.
 * Our mounts use metacopy=on (which forces redirect_dir=on), so the upper dir
 * can mislead:
 *  - a chmod/chown/touch/setxattr of a lower file leaves a *metacopy* file:
 *    right metadata, but its data is still below (read it through the merged view);
 *  - a renamed lower directory is a dir with trusted.overlay.redirect whose
 *    children stay in the lower layers (expand it from the merged view, as the
 *    copy overlay2's `mv` would have made).
 * This module hides both and yields the entries of that "virtual" overlay2
 * upper dir: a directory before its children, names in byte order at each
 * level (Go's filepath.Walk order).
 */
import { promises as fs, type BigIntStats } from 'node:fs';
import path from 'node:path';
import { errnoCode, failedPrecondition } from '../errors.js';
import { getXattr } from '../sys/xattr.js';

export interface OverlayLayerPaths {
  /** The layer's own diff dir (overlay upperdir). */
  upper: string;
  /** Parent layers' diff dirs, topmost first (overlay lowerdir order). */
  lowers: string[];
  /** Where the layer is mounted (needed for metacopy files and redirected dirs). */
  merged: string;
}

export const XATTR_OPAQUE = 'trusted.overlay.opaque';
export const XATTR_REDIRECT = 'trusted.overlay.redirect';
export const XATTR_METACOPY = 'trusted.overlay.metacopy';

const S_IFMT = 0o170000n;
const S_IFCHR = 0o020000n;
const S_IFDIR = 0o040000n;

export interface LayerEntry {
  /** Absolute path inside the layer, e.g. "/etc/hosts". */
  rel: string;
  /** An overlay whiteout (char 0/0): the name was deleted in this layer. */
  whiteout: boolean;
  /** lstat of the entry as overlay2 would have it (upper dir, or merged view inside a redirected dir). */
  stat: BigIntStats;
  /** Where to read metadata (xattrs, symlink target) from. */
  metaPath: string;
  /** Where to read regular-file data from (the merged view for metacopy files). */
  dataPath: string;
  /**
   * Directory overlay2 would have marked opaque: created where the lower
   * stack has a name (see lowerStackHasName). Not simply opaque=y, which
   * redirect_dir=on also puts on every new dir in a merged parent.
   */
  opaque: boolean;
  /** Comes from the merged view of a redirected directory rather than the upper dir. */
  expanded: boolean;
  /** Identity for hard-link grouping and size de-duplication. */
  inodeKey: string;
}

export function isWhiteoutStat(st: BigIntStats): boolean {
  return (BigInt(st.mode) & S_IFMT) === S_IFCHR && st.rdev === 0n;
}

export function isDirStat(st: BigIntStats): boolean {
  return (BigInt(st.mode) & S_IFMT) === S_IFDIR;
}

/** Byte-wise name order, as Go's sort.Strings (JS string order differs above the BMP). */
export function byteOrder(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

export async function sortedNames(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    // A directory removed while we walk (running container): nothing below it.
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return [];
    throw err;
  }
  return names.sort(byteOrder);
}

export async function lstatOrNull(p: string): Promise<BigIntStats | null> {
  try {
    return await fs.lstat(p, { bigint: true });
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return null;
    throw err;
  }
}

const join = (root: string, rel: string): string => (rel === '/' ? root : path.join(root, rel));
const child = (rel: string, name: string): string => (rel === '/' ? `/${name}` : `${rel}/${name}`);

function hasXattr(p: string, name: string): boolean {
  try {
    return getXattr(p, name) !== null;
  } catch (err) {
    if (errnoCode(err) === 'ENOTSUP' || errnoCode(err) === 'EOPNOTSUPP' || errnoCode(err) === 'ENOENT') return false;
    throw err;
  }
}

export function isOpaqueDir(p: string): boolean {
  try {
    const v = getXattr(p, XATTR_OPAQUE);
    return v !== null && v.length === 1 && v[0] === 0x79; // "y"
  } catch (err) {
    if (errnoCode(err) === 'ENOTSUP' || errnoCode(err) === 'EOPNOTSUPP' || errnoCode(err) === 'ENOENT') return false;
    throw err;
  }
}

/**
 * Docker's test for "this path existed in a parent layer" (changes.go): stat
 * (following symlinks) the path in each lower dir, topmost first; the first
 * hit wins, whatever it is (even a whiteout). Returns that stat or null.
 *
 * Deviation: Go treats ENOTDIR (a lower file where we look for a dir) as a
 * hard error that fails the whole `docker diff`; we treat it as "absent". A
 * symlink loop (ELOOP) counts as present when the name itself exists.
 */
export async function mobyLowerStat(lowers: string[], rel: string): Promise<BigIntStats | null> {
  for (const lower of lowers) {
    const p = join(lower, rel);
    try {
      return await fs.stat(p, { bigint: true });
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'ENOENT' || code === 'ENOTDIR') continue;
      if (code === 'ELOOP') {
        const l = await lstatOrNull(p);
        if (l) return l;
        continue;
      }
      throw err;
    }
  }
  return null;
}

/**
 * Whether overlay's lookup of `rel` in the lower layers alone finds anything,
 * a whiteout included (topmost first; a whiteout or non-directory ancestor
 * ends the search, an opaque ancestor stops descent to deeper layers).
 *
 * That is exactly when overlay2 (no redirect_dir) makes a directory created
 * at `rel` opaque: it is created "over a whiteout". With redirect_dir=on the
 * kernel also marks every new directory in a merged parent opaque, as an
 * optimisation, so opaque=y in our upper dirs only means what it means to
 * overlay2 when this returns true.
 */
export async function lowerStackHasName(lowers: string[], rel: string): Promise<boolean> {
  const parts = rel.split('/').filter(Boolean);
  for (const lower of lowers) {
    let prefix = lower;
    let stopBelow = false;
    for (let i = 0; i < parts.length; i++) {
      prefix = path.join(prefix, parts[i]!);
      const st = await lstatOrNull(prefix);
      if (!st) break;
      if (i === parts.length - 1) return true;
      if (isWhiteoutStat(st) || !isDirStat(st)) return false;
      if (isOpaqueDir(prefix)) stopBelow = true;
    }
    if (stopBelow) return false;
  }
  return false;
}

/** Entries of the merged view below `rel` (a redirected dir): what overlay2's copy would hold. */
async function* walkMerged(p: OverlayLayerPaths, rel: string): AsyncGenerator<LayerEntry> {
  for (const name of await sortedNames(join(p.merged, rel))) {
    const r = child(rel, name);
    const abs = join(p.merged, r);
    const st = await lstatOrNull(abs);
    if (!st) continue;
    yield {
      rel: r,
      whiteout: false,
      stat: st,
      metaPath: abs,
      dataPath: abs,
      opaque: false,
      expanded: true,
      inodeKey: `m:${st.dev}:${st.ino}`,
    };
    if (st.isDirectory()) yield* walkMerged(p, r);
  }
}

function requireMerged(p: OverlayLayerPaths, rel: string, why: string): string {
  if (!p.merged) throw failedPrecondition(`layer ${p.upper}: ${rel} is ${why}; its diff needs the mounted merged view`);
  return join(p.merged, rel);
}

/**
 * `cut`: an ancestor in the upper dir is opaque, so overlay looks nothing up
 * below it in the lower layers.
 */
async function* walkUpper(p: OverlayLayerPaths, rel: string, cut: boolean): AsyncGenerator<LayerEntry> {
  for (const name of await sortedNames(join(p.upper, rel))) {
    const r = child(rel, name);
    const abs = join(p.upper, r);
    const st = await lstatOrNull(abs);
    if (!st) continue;
    const base = {
      rel: r,
      whiteout: false,
      stat: st,
      metaPath: abs,
      dataPath: abs,
      opaque: false,
      expanded: false,
      inodeKey: `u:${st.ino}`,
    };
    if (isWhiteoutStat(st)) {
      yield { ...base, whiteout: true };
      continue;
    }
    if (st.isDirectory()) {
      if (hasXattr(abs, XATTR_REDIRECT)) {
        // A renamed (or moved) lower dir. overlay2 would have copied the whole
        // tree to this name, after deleting whatever was there before (which
        // makes the new dir opaque).
        const m = requireMerged(p, r, 'a redirected (renamed) directory');
        const mst = await lstatOrNull(m);
        if (!mst) continue;
        yield {
          ...base,
          stat: mst,
          metaPath: m,
          dataPath: m,
          expanded: true,
          opaque: !cut && (await lowerStackHasName(p.lowers, r)),
          inodeKey: `m:${mst.dev}:${mst.ino}`,
        };
        yield* walkMerged(p, r);
        continue;
      }
      const rawOpaque = isOpaqueDir(abs);
      yield { ...base, opaque: rawOpaque && !cut && (await lowerStackHasName(p.lowers, r)) };
      yield* walkUpper(p, r, cut || rawOpaque);
      continue;
    }
    if (st.isFile() && (hasXattr(abs, XATTR_METACOPY) || hasXattr(abs, XATTR_REDIRECT))) {
      yield { ...base, dataPath: requireMerged(p, r, 'a metacopy file') };
      continue;
    }
    yield base;
  }
}

/** Walks the layer as overlay2's upper dir would be (see the module comment). */
export function walkOverlayLayer(p: OverlayLayerPaths): AsyncGenerator<LayerEntry> {
  return walkUpper(p, '/', false);
}
