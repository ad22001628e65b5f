/**
 * What a layer changes relative to its parent (docker diff; the list behind
 * docker commit's tar in the naive case).
 *
 * Two ways, as in Docker's overlay2 driver (moby v20.10, pkg/archive):
 *  - overlayChanges: the layer's upper dir against its real parents
 *    (moby OverlayChanges), reproducing what overlay2 reports even though our
 *    mounts use metacopy/redirect_dir (see overlaywalk.ts);
 *  - treeChanges: two whole trees compared (moby ChangesDirs), used when the
 *    parent asked for is not the layer's real parent.
 */
import { promises as fs, type BigIntStats } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { errnoCode } from '../errors.js';
import { getXattr } from '../sys/xattr.js';
import {
  byteOrder,
  lstatOrNull,
  mobyLowerStat,
  sortedNames,
  walkOverlayLayer,
  type OverlayLayerPaths,
} from './overlaywalk.js';

export type { OverlayLayerPaths } from './overlaywalk.js';

/** Same numbering as Docker's archive.ChangeType, which is also the graph-driver wire value. */
export enum ChangeKind {
  Modify = 0,
  Add = 1,
  Delete = 2,
}

export interface Change {
  /** Absolute path inside the layer, e.g. "/etc/hosts". */
  path: string;
  kind: ChangeKind;
}

const NS = 1_000_000_000n;

/**
 * Docker's sameFsTime: equal, or same second with either side having no
 * sub-second part (tar and older tools drop nanoseconds).
 */
function sameFsTime(a: bigint, b: bigint): boolean {
  if (a === b) return true;
  const sa = a / NS - (a % NS < 0n ? 1n : 0n);
  const sb = b / NS - (b % NS < 0n ? 1n : 0n);
  if (sa !== sb) return false;
  return a - sa * NS === 0n || b - sb * NS === 0n;
}

const parentOf = (p: string): string => {
  const d = path.posix.dirname(p);
  return d === '.' ? '/' : d;
};

/**
 * The changes of an overlay layer relative to its real parents, exactly as
 * Docker's overlay2 (native diff) reports them:
 *  - walk order (a dir before its children, names in byte order);
 *  - a whiteout is a Delete; an opaque directory is reported as a Delete too
 *    (Docker's quirk: "rm -rf d; mkdir d" gives "D /d" and no "A /d"), and its
 *    children are Add or Modify by whether the path exists in a parent layer;
 *  - an entry is Modify when the path exists in any parent layer (stat,
 *    following symlinks, first hit wins), else Add; a directory that exists
 *    below with the same size, mode and mtime is not reported itself;
 *  - the parent dir of an Add/Delete is inserted as Modify before it, once.
 */
export async function overlayChanges(p: OverlayLayerPaths): Promise<Change[]> {
  const changes: Change[] = [];
  const changedDirs = new Set<string>();
  for await (const e of walkOverlayLayer(p)) {
    const isDir = !e.whiteout && e.stat.isDirectory();
    let kind: ChangeKind;
    if (e.whiteout || (isDir && e.opaque)) {
      kind = ChangeKind.Delete;
    } else {
      const lower = await mobyLowerStat(p.lowers, e.rel);
      if (!lower) {
        kind = ChangeKind.Add;
      } else {
        if (
          isDir &&
          lower.isDirectory() &&
          lower.size === e.stat.size &&
          lower.mode === e.stat.mode &&
          sameFsTime(lower.mtimeNs, e.stat.mtimeNs)
        ) {
          continue; // the dir only holds changes; it is not changed itself
        }
        kind = ChangeKind.Modify;
      }
    }
    if (isDir) changedDirs.add(e.rel);
    if (kind !== ChangeKind.Modify) {
      const parent = parentOf(e.rel);
      if (parent !== '/' && !changedDirs.has(parent)) {
        changes.push({ path: parent, kind: ChangeKind.Modify });
        changedDirs.add(parent);
      }
    }
    changes.push({ path: e.rel, kind });
  }
  return changes;
}

// ---------------------------------------------------------------------------
// Naive: two whole trees (moby ChangesDirs)

interface TreeNode {
  name: string;
  stat: BigIntStats | null; // null for the root
  capability: Buffer | null;
  children: Map<string, TreeNode>;
  added: boolean;
}

const S_IFDIR = 0o040000;
const EMPTY = Buffer.alloc(0);

/** Docker's isDir: mode & S_IFDIR, which (sic) also matches block devices and sockets. */
function nodeIsDir(n: TreeNode): boolean {
  return n.stat === null || (Number(n.stat.mode) & S_IFDIR) !== 0;
}

/** Docker's statDifferent (changes_unix.go). */
function statDifferent(a: BigIntStats, b: BigIntStats): boolean {
  if (a.mode !== b.mode || a.uid !== b.uid || a.gid !== b.gid || a.rdev !== b.rdev) return true;
  if ((Number(a.mode) & S_IFDIR) !== S_IFDIR) {
    if (!sameFsTime(a.mtimeNs, b.mtimeNs) || a.size !== b.size) return true;
  }
  return false;
}

function readCapability(p: string): Buffer | null {
  try {
    return getXattr(p, 'security.capability');
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOENT') return null;
    throw err;
  }
}

const newRoot = (): TreeNode => ({ name: '/', stat: null, capability: null, children: new Map(), added: false });

/**
 * Collects both trees in parallel. Like moby's walker, a name whose inode is
 * the same on both sides (same device) is pruned: it cannot hold a change.
 */
async function collect(
  dirs: [string, string],
  roots: [TreeNode, TreeNode],
  rel: string,
  infos: [BigIntStats | null, BigIntStats | null],
): Promise<void> {
  const isDir = infos.map((i) => i !== null && i.isDirectory());
  if (!isDir[0] && !isDir[1]) return;
  const sameDevice = infos[0] !== null && infos[1] !== null && infos[0].dev === infos[1].dev;
  const lists = await Promise.all(dirs.map((d, i) => (isDir[i] ? sortedNames(path.join(d, rel)) : Promise.resolve([]))));
  const names = [...new Set([...lists[0]!, ...lists[1]!])].sort(byteOrder);
  for (const name of names) {
    const r = rel === '/' ? `/${name}` : `${rel}/${name}`;
    const st: [BigIntStats | null, BigIntStats | null] = [
      isDir[0] ? await lstatOrNull(path.join(dirs[0], r)) : null,
      isDir[1] ? await lstatOrNull(path.join(dirs[1], r)) : null,
    ];
    if (sameDevice && st[0] && st[1] && st[0].ino === st[1].ino && st[0].dev === st[1].dev) continue;
    for (const side of [0, 1] as const) {
      const s = st[side];
      if (!s) continue;
      const parent = lookUp(roots[side], rel);
      if (!parent) throw new Error(`tree walk: no parent for ${r}`);
      parent.children.set(name, {
        name,
        stat: s,
        capability: readCapability(path.join(dirs[side], r)),
        children: new Map(),
        added: false,
      });
    }
    await collect(dirs, roots, r, st);
  }
}

function lookUp(root: TreeNode, rel: string): TreeNode | null {
  let cur: TreeNode | undefined = root;
  for (const part of rel.split('/')) {
    if (!part) continue;
    cur = cur.children.get(part);
    if (!cur) return null;
  }
  return cur;
}

function addChanges(info: TreeNode, old: TreeNode | null, rel: string, out: Change[]): void {
  const sizeAtEntry = out.length;
  if (old === null) {
    out.push({ path: rel, kind: ChangeKind.Add });
    info.added = true;
  }
  const oldChildren = new Map(old !== null && nodeIsDir(info) ? old.children : []);
  // moby iterates a Go map here (random order); we use name order.
  for (const name of [...info.children.keys()].sort(byteOrder)) {
    const newChild = info.children.get(name)!;
    const oldChild = oldChildren.get(name) ?? null;
    const r = rel === '/' ? `/${name}` : `${rel}/${name}`;
    if (oldChild !== null) {
      // bytes.Equal: a missing attribute equals an empty one.
      const capSame = (oldChild.capability ?? EMPTY).equals(newChild.capability ?? EMPTY);
      if (statDifferent(oldChild.stat!, newChild.stat!) || !capSame) {
        out.push({ path: r, kind: ChangeKind.Modify });
        newChild.added = true;
      }
      oldChildren.delete(name);
    }
    addChanges(newChild, oldChild, r, out);
  }
  for (const name of [...oldChildren.keys()].sort(byteOrder)) {
    out.push({ path: rel === '/' ? `/${name}` : `${rel}/${name}`, kind: ChangeKind.Delete });
  }
  if (out.length > sizeAtEntry && nodeIsDir(info) && !info.added && rel !== '/') {
    out.splice(sizeAtEntry, 0, { path: rel, kind: ChangeKind.Modify });
  }
}

/**
 * Changes of the tree at newRoot relative to the tree at oldRoot (moby
 * ChangesDirs). With oldRoot null every entry is an Add. Unlike overlay
 * changes, an opaque replacement shows as Modify/Add/Delete of the entries.
 */
export async function treeChanges(newRootDir: string, oldRootDir: string | null): Promise<Change[]> {
  let oldDir = oldRootDir;
  let tmp: string | null = null;
  if (!oldDir) {
    tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-empty-'));
    oldDir = tmp;
  }
  try {
    const oldTree = newRoot();
    const newTree = newRoot();
    const infos: [BigIntStats | null, BigIntStats | null] = [
      await fs.lstat(oldDir, { bigint: true }),
      await fs.lstat(newRootDir, { bigint: true }),
    ];
    await collect([oldDir, newRootDir], [oldTree, newTree], '/', infos);
    const out: Change[] = [];
    addChanges(newTree, oldTree, '/', out);
    return out;
  } finally {
    if (tmp) await fs.rmdir(tmp);
  }
}
