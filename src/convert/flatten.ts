/**
 * Flattening: apply an image's layers in order (OCI image-spec layer
 * semantics: whiteouts, opaque directories, hard links across layers) to an
 * in-memory tree of metadata, staging every regular file's content by digest.
 * The result is the entry list and manifest of a Gear index layer.
 *
 * Rules (docs/format.md "Conversion"):
 * - paths are normalised ("./a//b" → "a/b", a leading "/" is dropped); a ".."
 *   component is path traversal and fails the conversion;
 * - whiteouts (".wh.NAME") and opaque markers (".wh..wh..opq") of a layer
 *   apply to the lower layers only, before the layer's own entries;
 * - an entry under an existing non-directory replaces it with a directory;
 *   a non-directory replacing a directory removes its subtree;
 * - a hard link shares the target's inode: later changes to the target path
 *   do not change the link (as on disk);
 * - `trusted.overlay.*` and `user.overlay.*` xattrs are dropped (overlayfs
 *   would interpret them); the root directory's own entry is dropped;
 * - entries under the reserved `.gear/` are refused.
 */
import { invalidArgument } from '../core/errors.js';
import { comparePaths, GEAR_FORMAT_VERSION, RESERVED_DIR, type BlobLocation, type IndexFile, type IndexManifest } from '../core/index/manifest.js';
import { manifestHeader } from '../core/index/index-layer.js';
import { readTar, type TarHeader } from '../core/index/tar.js';
import { layerTar, type SourceLayer } from './source.js';
import type { ContentStage } from './stage.js';
import type { ProgressEvent } from './types.js';

interface Inode {
  header: TarHeader; // type is never 'dir' or 'link'
  digest?: string; // regular files with content
}

interface Dir {
  kind: 'dir';
  header: TarHeader;
  children: Map<string, Node>;
}

interface Leaf {
  kind: 'leaf';
  inode: Inode;
}

type Node = Dir | Leaf;

const WHITEOUT = '.wh.';
const OPAQUE = '.wh..wh..opq';

/** Path traversal or another unsafe path in a layer. Class InvalidArgument. */
function badPath(layer: string, raw: string, why: string): Error {
  return invalidArgument(`${layer}: entry ${JSON.stringify(raw.slice(0, 200))}: ${why}`);
}

/** "./a//b/" → ["a","b"]; "/" or "." → []; throws on "..". */
export function splitPath(layer: string, raw: string): string[] {
  const out: string[] = [];
  for (const c of raw.split('/')) {
    if (c === '' || c === '.') continue;
    if (c === '..') throw badPath(layer, raw, 'path traversal ("..") is not allowed');
    out.push(c);
  }
  return out;
}

/** The header of a directory the layers imply but never list (the root, or a parent of a listed path). */
function implicitDir(): TarHeader {
  return { ...manifestHeader(0), path: '', type: 'dir', mode: 0o755 };
}

function cleanXattrs(h: TarHeader): TarHeader {
  for (const k of [...h.xattrs.keys()]) {
    if (k.startsWith('trusted.overlay.') || k.startsWith('user.overlay.')) h.xattrs.delete(k);
  }
  return h;
}

export interface FlattenStats {
  /** Uncompressed layer bytes read. */
  layerBytes: number;
  entries: number;
}

interface Pending {
  comps: string[];
  header: TarHeader;
  digest?: string;
}

/**
 * Where Flattener puts file contents. `addDeferred`, when present, is used
 * instead of `add`: it resolves once the body has been read, to `done`, a
 * promise of the digest, so the next entries are read while the content is hashed
 * elsewhere (all are awaited at the end of the layer).
 */
export interface ContentSink {
  add: ContentStage['add'];
  addDeferred?(body: AsyncIterable<Buffer>, size: number): Promise<{ done: Promise<{ digest: string; size: number }> }>;
}

export class Flattener {
  private readonly root: Dir = { kind: 'dir', header: implicitDir(), children: new Map() };
  readonly stats: FlattenStats = { layerBytes: 0, entries: 0 };

  // Only `add` is used (or `addDeferred`, when the sink has it): gear analyze passes a sink that measures
  // contents instead of staging them; format v3 passes a MemberStage, whose workers hash while the tar reads on.
  constructor(private readonly stage: ContentSink) {}

  /**
   * Applies one layer given as an uncompressed tar byte stream. `name` is
   * used in error messages. On error the tree is left unchanged... only up to
   * the failed layer (the conversion is abandoned anyway).
   */
  async applyLayer(name: string, tar: AsyncIterable<Uint8Array>, onFileBytes?: (n: number) => void): Promise<void> {
    const whiteouts: string[][] = [];
    const opaques: string[][] = [];
    const pending: Pending[] = [];
    const deferred: Promise<unknown>[] = [];
    for await (const e of readTar(tar)) {
      const h = e.header;
      this.stats.entries++;
      const comps = splitPath(name, h.path);
      if (comps[0] === RESERVED_DIR) throw badPath(name, h.path, `the ${RESERVED_DIR}/ directory is reserved for the Gear index`);
      const base = comps[comps.length - 1];
      if (base !== undefined && base.startsWith(WHITEOUT)) {
        if (base === OPAQUE) opaques.push(comps.slice(0, -1));
        else {
          const target = base.slice(WHITEOUT.length);
          if (target === '' || target === '.' || target === '..' || target.startsWith(WHITEOUT)) {
            throw badPath(name, h.path, 'invalid whiteout');
          }
          whiteouts.push([...comps.slice(0, -1), target]);
        }
        continue;
      }
      if (h.type === 'link') {
        h.linkname = splitPath(name, h.linkname).join('/');
        if (h.linkname === '') throw badPath(name, h.path, 'hard link to the root');
      }
      let digest: string | undefined;
      let later: Promise<{ digest: string }> | undefined;
      if (h.type === 'file' && h.size > 0) {
        const raw = e.body();
        const body = onFileBytes
          ? (async function* () {
              for await (const c of raw) {
                onFileBytes(c.length);
                yield c;
              }
            })()
          : raw;
        if (this.stage.addDeferred) later = (await this.stage.addDeferred(body, h.size)).done;
        else digest = (await this.stage.add(body, h.size)).digest;
      }
      const p: Pending = { comps, header: cleanXattrs(h), digest };
      if (later) {
        const d = later.then((r) => (p.digest = r.digest));
        d.catch(() => undefined); // awaited below; not unhandled if the tar fails first
        deferred.push(d);
      }
      pending.push(p);
    }
    await Promise.all(deferred);
    // Whiteouts and opaque markers hide lower layers only: apply them first.
    for (const p of opaques) {
      const d = this.lookup(p);
      if (d?.kind === 'dir') d.children.clear();
    }
    for (const p of whiteouts) {
      const parent = this.lookup(p.slice(0, -1));
      if (parent?.kind === 'dir') parent.children.delete(p[p.length - 1]!);
    }
    for (const p of pending) this.put(name, p);
  }

  private lookup(comps: string[]): Node | undefined {
    let n: Node = this.root;
    for (const c of comps) {
      if (n.kind !== 'dir') return undefined;
      const next = n.children.get(c);
      if (!next) return undefined;
      n = next;
    }
    return n;
  }

  private parentDir(comps: string[]): Dir {
    let d = this.root;
    for (const c of comps.slice(0, -1)) {
      let next = d.children.get(c);
      if (!next || next.kind !== 'dir') {
        next = { kind: 'dir', header: implicitDir(), children: new Map() };
        d.children.set(c, next);
      }
      d = next;
    }
    return d;
  }

  private put(layer: string, p: Pending): void {
    const { comps, header: h } = p;
    if (comps.length === 0) {
      if (h.type !== 'dir') throw badPath(layer, h.path, `the image root cannot be a ${h.type}`);
      return; // the root's own metadata is not part of the format
    }
    const name = comps[comps.length - 1]!;
    const parent = this.parentDir(comps);
    const existing = parent.children.get(name);
    if (h.type === 'dir') {
      if (existing?.kind === 'dir') existing.header = h;
      else parent.children.set(name, { kind: 'dir', header: h, children: new Map() });
      return;
    }
    if (h.type === 'link') {
      const target = this.lookup(h.linkname.split('/'));
      if (!target) throw badPath(layer, h.path, `hard link target ${JSON.stringify(h.linkname)} does not exist`);
      if (target.kind === 'dir') throw badPath(layer, h.path, `hard link target ${JSON.stringify(h.linkname)} is a directory`);
      parent.children.set(name, { kind: 'leaf', inode: target.inode });
      return;
    }
    parent.children.set(name, { kind: 'leaf', inode: { header: h, digest: p.digest } });
  }

  /**
   * The flattened tree as index-layer entries (in comparePaths order) and the
   * manifest. Each regular file's first path (in that order) is a file entry;
   * its other paths are hard links to it. Call it once, after the last layer:
   * it lets go of the tree.
   */
  result(location?: BlobLocation): { entries: TarHeader[]; manifest: IndexManifest } {
    const entries: TarHeader[] = [];
    const files: IndexFile[] = [];
    const firstPath = new Map<Inode, string>();
    const walk = (d: Dir, prefix: string): void => {
      // comparePaths on names (no '/'): bytewise UTF-8 order without a Buffer per comparison.
      const names = [...d.children.keys()].sort(comparePaths);
      for (const n of names) {
        const node = d.children.get(n)!;
        const path = prefix + n;
        if (node.kind === 'dir') {
          entries.push({ ...node.header, path, size: 0, linkname: '' });
          walk(node, `${path}/`);
          continue;
        }
        const first = firstPath.get(node.inode);
        if (first !== undefined) {
          entries.push({ ...node.inode.header, path, type: 'link', size: 0, linkname: first, devmajor: 0, devminor: 0, xattrs: new Map() });
          continue;
        }
        firstPath.set(node.inode, path);
        const h = node.inode.header;
        entries.push({ ...h, path, size: 0 });
        if (h.type === 'file' && node.inode.digest !== undefined) {
          files.push({ path, digest: node.inode.digest, size: h.size });
        }
      }
    };
    walk(this.root, '');
    // Spent: the entries are copies, so the tree (a million nodes for a million files) can go now.
    this.root.children.clear();
    const manifest: IndexManifest = { version: GEAR_FORMAT_VERSION, files };
    if (location) manifest.location = location;
    return { entries, manifest };
  }
}

/** Step 1 of every conversion: flattens `layers` in order into `flat`, verified while read, reporting progress. */
export async function flattenLayers(flat: Flattener, layers: readonly SourceLayer[], progress: (e: ProgressEvent) => void): Promise<void> {
  for (let i = 0; i < layers.length; i++) {
    const layer = layers[i]!;
    progress({ kind: 'layer', index: i, count: layers.length, name: layer.name });
    const tar = (async function* () {
      for await (const c of layerTar(layer)) {
        flat.stats.layerBytes += c.length;
        progress({ kind: 'layer-bytes', bytes: c.length });
        yield c;
      }
    })();
    await flat.applyLayer(layer.name, tar, (n) => progress({ kind: 'file-bytes', bytes: n }));
  }
}
