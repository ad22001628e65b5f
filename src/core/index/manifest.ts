/**
 * The Gear index manifest (`.gear/index.json`, the first entry of an index
 * layer) and the constants of the Gear image format, versions 1, 2 and 3
 * (version 3's pack members: pack-layout.ts).
 * docs/format.md is the specification; this file implements it.
 *
 * A parsed manifest is untrusted input (it arrives in a layer from a
 * registry): `parseIndexManifest` validates every field before any digest or
 * path is used to build a URL or a file name.
 */
import { failedPrecondition, invalidArgument } from '../errors.js';
import type { TarHeader } from './tar.js';
import { decodeTreeEntry, encodeTreeEntry, shown } from './tree.js';
import { Item, Named, type Where } from './shown.js';
import { checkPackLayout, decodePackedContent, decodePacks, type PackedContent, type PackRef } from './pack-layout.js';

export { chunkBytes, type FileChunk, type MemberEncoding, type PackedContent, type PackMember, type PackRef } from './pack-layout.js';

/**
 * The format version `gear convert` writes. Version 3 stores files in packs
 * (docs/format.md §10); version 2 carries the tree in the manifest (one tar
 * entry); version 1 carries it as tar entries after it.
 */
export const GEAR_FORMAT_VERSION = 3;
/** Every format version this code reads (and writes, on request). */
export const GEAR_FORMAT_VERSIONS: readonly number[] = [1, 2, 3];

/** Reserved path of the index manifest inside the index layer; always the first entry. */
export const INDEX_MANIFEST_PATH = '.gear/index.json';
/** Reserved top-level directory; no other entry of an index layer may live under it. */
export const RESERVED_DIR = '.gear';

/**
 * Image config labels, set by `gear convert`.
 * - GEAR_VERSION_LABEL: the format version ("1" or "2"). A driver treats an image as
 *   a Gear image only when its single layer starts with INDEX_MANIFEST_PATH;
 *   the label is for people and tools that see only the config.
 * - SOURCE_DIGEST_LABEL: digest of the source image's manifest when the source
 *   had one (registry, oci:), otherwise of its config (docker-archive, docker-daemon).
 */
export const GEAR_VERSION_LABEL = 'io.gear.format.version';
export const SOURCE_DIGEST_LABEL = 'io.gear.source.digest';

/** Media types of the Gear format. */
export const GearMediaType = {
  /** A Gear file stored raw: the blob is the file content, blob digest = content digest. */
  File: 'application/vnd.gear.file.v1',
  /** A Gear file stored as one gzip member of the content; the pool key is still the content digest. */
  FileGzip: 'application/vnd.gear.file.v1+gzip',
  /** artifactType of a keep-alive manifest that references Gear files. */
  FilesManifest: 'application/vnd.gear.files.v1',
  /**
   * artifactType of a Gear image manifest attached to its source image as an
   * OCI referrer (`gear convert --attach`, docs/format.md §9).
   */
  IndexReferrer: 'application/vnd.gear.index.v1',
  /** A pack of format version 3: the concatenation of separately stored members (docs/format.md §10). */
  Pack: 'application/vnd.gear.pack.v1',
} as const;

/** Where the Gear files of an image live: one repository of one registry. */
export interface BlobLocation {
  /** Registry host[:port] as in an image reference, e.g. "registry.example.com:5000". */
  registry: string;
  /** Repository path, e.g. "library/debian". */
  repository: string;
}

/**
 * The stored form of a Gear file when it is not the raw content: an OCI
 * descriptor of the compressed blob. Absent: the blob is the raw content
 * (blob digest = content digest, blob size = size).
 */
export interface StoredBlob {
  mediaType: typeof GearMediaType.FileGzip;
  digest: string;
  size: number;
}

/**
 * One non-empty regular file of the image. Version 3 stores it in packs
 * (`member`, or `chunkSize` + `chunks`; PackedContent), never as a `blob`.
 */
export interface IndexFile extends PackedContent {
  /** Path relative to the image root: no leading "/", no ".", ".." or empty components. */
  path: string;
  /** sha256 of the content: the pool key, and the blob digest when stored raw. */
  digest: string;
  /** Content size in bytes, > 0. */
  size: number;
  /** How the content is stored in the registry, when not raw. */
  blob?: StoredBlob;
}

export interface IndexManifest {
  /** 1, 2 or 3 (GEAR_FORMAT_VERSIONS). */
  version: number;
  /** Version 3: the pack blobs the files are stored in, named by index (docs/format.md §10). */
  packs?: PackRef[];
  /** Absent when the image was written to an OCI layout without a known registry. */
  location?: BlobLocation;
  /** Sorted by `comparePaths`, unique. */
  files: IndexFile[];
  /**
   * Paths of `files` a node fetches in the background as soon as it has the
   * index (pull), in this order: the files a recorded run of the image opened
   * (`gear prefetch`). Unique; absent or empty: nothing is prefetched.
   */
  prefetch?: string[];
  /**
   * Versions 2 and 3: the flattened tree (docs/format.md §3.6), as index-layer
   * entries in comparePaths order; `files` are its regular files with
   * content. Version 1: absent (the tree is the tar entries after the
   * manifest).
   */
  tree?: TarHeader[];
}

/** Upper bound on the encoded manifest, against memory exhaustion (256 MiB: ~1.5 M files). */
export const MAX_MANIFEST_BYTES = 256 * 1024 * 1024;
/**
 * Files of at least this many bytes are "big" (docs/format.md §4): the
 * converter stores them raw so that a driver can serve HTTP ranges of the
 * content, and the lazy path streams them (reads are served while the file
 * downloads) instead of fetching them whole before the first read.
 */
export const BIG_FILE_MIN_BYTES = 8 * 1024 * 1024;
/** Longest accepted path in bytes (Linux PATH_MAX). */
export const MAX_PATH_BYTES = 4096;
/** Longest accepted path component in bytes (Linux NAME_MAX). */
export const MAX_NAME_BYTES = 255;

const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;
// docker/distribution reference grammar, anchored.
const REGISTRY_RE = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[a-fA-F0-9:]+\])(?::[0-9]{1,5})?$/;
const REPOSITORY_RE = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$/;

/**
 * Total order on paths used by the index layer and the manifest: component by
 * component, each compared as UTF-8 bytes. ("a" < "a/b" < "a-c"; a directory
 * comes right before its contents.)
 */
export function comparePaths(a: string, b: string): number {
  // UTF-16 code units order like UTF-8 bytes below the surrogates; '/' sorts as NUL.
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    if (x >= 0xd800 || y >= 0xd800) return Buffer.compare(Buffer.from(a.replaceAll('/', '\0')), Buffer.from(b.replaceAll('/', '\0')));
    if (x === 47) x = 0;
    if (y === 47) y = 0;
    return x < y ? -1 : 1;
  }
  return a.length === b.length ? 0 : a.length < b.length ? -1 : 1;
}

/**
 * Why `p` is not a clean image path, or undefined when it is one: relative,
 * no empty, "." or ".." components, no NUL, at most MAX_PATH_BYTES, no
 * component over MAX_NAME_BYTES.
 */
export function pathProblem(p: string): string | undefined {
  if (p === '') return 'empty path';
  if (p.includes('\0')) return 'contains a NUL byte';
  if (p.length > MAX_PATH_BYTES / 3 && Buffer.byteLength(p) > MAX_PATH_BYTES) return `longer than ${MAX_PATH_BYTES} bytes`;
  if (p.charCodeAt(0) === 47) return 'absolute path';
  // One pass over the components (this runs for every path of every index).
  let start = 0;
  for (;;) {
    let end = p.indexOf('/', start);
    if (end < 0) end = p.length;
    const n = end - start;
    if (n === 0) return 'empty path component';
    if (n <= 2 && p.charCodeAt(start) === 46 && (n === 1 || p.charCodeAt(start + 1) === 46)) return `"${p.slice(start, end)}" component`;
    if (n > MAX_NAME_BYTES / 3 && Buffer.byteLength(p.slice(start, end)) > MAX_NAME_BYTES) return `a component longer than ${MAX_NAME_BYTES} bytes (NAME_MAX)`;
    if (end === p.length) return undefined;
    start = end + 1;
  }
}

/**
 * Validates a decoded manifest document and returns it as an IndexManifest
 * (a fresh object holding only the known members). A version 2 tree is
 * checked as index-layer.ts checkIndexEntries checks tar entries: clean
 * paths in strictly increasing order, nothing under `.gear/`, hard links to
 * earlier non-directories. Throws InvalidArgument on any malformed field and
 * FailedPrecondition on an unsupported version. With `consume`, the raw tree
 * entries of `doc` are cleared as they are decoded (the caller's doc is left
 * alone otherwise).
 */
export function validateIndexManifest(doc: unknown, opts: { consume?: boolean } = {}): IndexManifest {
  if (!doc || typeof doc !== 'object' || Array.isArray(doc)) throw invalidArgument(`gear index: the manifest must be a JSON object, not ${shown(Array.isArray(doc) ? '[array]' : doc)}`);
  const o = doc as Record<string, unknown>;
  if (typeof o.version !== 'number' || !GEAR_FORMAT_VERSIONS.includes(o.version)) {
    if (typeof o.version === 'number' && Number.isInteger(o.version)) {
      throw failedPrecondition(
        `gear index: unsupported format version ${o.version} (this gear reads versions ${listed(GEAR_FORMAT_VERSIONS, 'and')}; upgrade gear on this node)`,
      );
    }
    throw invalidArgument(`gear index: "version" must be the integer ${listed(GEAR_FORMAT_VERSIONS, 'or')}, not ${shown(o.version)}`);
  }
  const out: IndexManifest = { version: o.version, files: [] };
  if (o.location !== undefined) {
    const l = o.location as Record<string, unknown>;
    if (!l || typeof l !== 'object' || Array.isArray(l)) throw invalidArgument(`gear index: "location" must be an object, not ${shown(l)}`);
    if (typeof l.registry !== 'string' || l.registry.length > 255 || !REGISTRY_RE.test(l.registry)) {
      throw invalidArgument(`gear index: location.registry ${shown(l.registry)} is not a registry host[:port] (at most 255 characters)`);
    }
    if (typeof l.repository !== 'string' || l.repository.length > 255 || !REPOSITORY_RE.test(l.repository)) {
      throw invalidArgument(`gear index: location.repository ${shown(l.repository)} is not a repository path (lowercase components, at most 255 characters)`);
    }
    out.location = { registry: l.registry, repository: l.repository };
  }
  if (out.version === 1) {
    if (!Array.isArray(o.files)) throw invalidArgument(`gear index: version 1 needs "files" as an array, not ${shown(o.files)}`);
    let prev: string | undefined;
    for (let i = 0; i < o.files.length; i++) {
      const f = o.files[i] as Record<string, unknown>;
      const where = `gear index: files[${i}]`;
      if (!f || typeof f !== 'object' || Array.isArray(f)) throw invalidArgument(`${where}: must be an object, not ${shown(f)}`);
      if (typeof f.path !== 'string') throw invalidArgument(`${where}: "path" must be a string, not ${shown(f.path)}`);
      checkListedPath(f.path, prev, where);
      out.files.push(validateContent(f, f.path, `${where} ${JSON.stringify(f.path.slice(0, 200))}`));
      prev = f.path;
    }
  } else {
    // Versions 2 and 3: the files are the tree's regular files that carry a digest.
    const v = out.version;
    if (o.files !== undefined) throw invalidArgument(`gear index: version ${v} has no "files" member (its files are in "tree")`);
    if (!Array.isArray(o.tree)) throw invalidArgument(`gear index: version ${v} needs "tree" as an array, not ${shown(o.tree)}`);
    if (v === 3) out.packs = decodePacks(o.packs);
    else if (o.packs !== undefined) throw invalidArgument(`gear index: version ${v} has no "packs" member (packs are version 3)`);
    const tree: TarHeader[] = new Array(o.tree.length);
    const linkable = new Set<string>();
    let prev: string | undefined;
    for (let i = 0; i < o.tree.length; i++) {
      const at = new Item('gear index: tree', i);
      const h = decodeTreeEntry(o.tree[i], at);
      checkListedPath(h.path, prev, at);
      const where = new Named(at, h.path);
      prev = h.path;
      if (h.type === 'link') {
        if (!linkable.has(h.linkname)) {
          throw invalidArgument(`${where}: hard link to ${JSON.stringify(h.linkname.slice(0, 200))}, which is not an earlier non-directory entry (a hard link names an earlier file, symlink, device or fifo of the tree)`);
        }
      } else if (h.type !== 'dir') linkable.add(h.path);
      const e = o.tree[i] as Record<string, unknown>;
      if (e.digest !== undefined || e.size !== undefined || e.blob !== undefined || (out.packs && (e.pack !== undefined || e.chunks !== undefined))) {
        if (h.type !== 'file') throw invalidArgument(`${where}: only a regular file has a "digest", "size", "blob", "pack" or "chunks" (this is a ${h.type})`);
        const f = validateContent(e, h.path, where, out.packs);
        out.files.push(f);
      }
      tree[i] = h;
      // A document parseIndexManifest decoded itself is ours: let each raw entry go once decoded
      // (a million-entry tree otherwise exists twice at the peak of a pull).
      if (opts.consume) o.tree[i] = undefined;
    }
    out.tree = tree;
  }
  checkOneSizePerContent(out.files);
  if (out.packs) checkPackLayout(out.files);
  if (o.prefetch !== undefined) {
    if (!Array.isArray(o.prefetch)) throw invalidArgument(`gear index: "prefetch" must be an array, not ${shown(o.prefetch)}`);
    if (o.prefetch.length > out.files.length) {
      throw invalidArgument(`gear index: "prefetch" lists ${o.prefetch.length} paths, more than the ${out.files.length} files with content (each at most once)`);
    }
    const known = new Set(out.files.map((f) => f.path));
    const seen = new Set<string>();
    for (let i = 0; i < o.prefetch.length; i++) {
      const p = o.prefetch[i] as unknown;
      if (typeof p !== 'string') throw invalidArgument(`gear index: prefetch[${i}] must be a path (a string), not ${shown(p)}`);
      if (!known.has(p)) {
        const kind = out.tree?.find((h) => h.path === p)?.type;
        const what = kind ? `a ${kind === 'file' ? 'regular file without content' : kind}` : 'not a path of the index';
        throw invalidArgument(`gear index: prefetch[${i}] ${JSON.stringify(p.slice(0, 200))} is ${what}; prefetch lists only files with content`);
      }
      if (seen.has(p)) throw invalidArgument(`gear index: prefetch[${i}] ${JSON.stringify(p.slice(0, 200))} is repeated`);
      seen.add(p);
    }
    if (o.prefetch.length > 0) out.prefetch = o.prefetch as string[];
  }
  return out;
}

/** "1, 2 and 3" */
function listed(xs: readonly number[], word: string): string {
  return xs.length < 2 ? xs.join('') : `${xs.slice(0, -1).join(', ')} ${word} ${xs[xs.length - 1]}`;
}

/**
 * The path rules of every listed path (v1 `files`, v2 `tree`, v1 tar entries
 * after the manifest): a clean path (pathProblem), not under `.gear/`, after
 * `prev` in comparePaths order. Throws InvalidArgument prefixed with `where`.
 */
export function checkListedPath(p: string, prev: string | undefined, where: Where): void {
  const problem = pathProblem(p);
  if (problem) throw invalidArgument(`${where}: path ${JSON.stringify(p.slice(0, 200))}: ${problem}`);
  if (p === RESERVED_DIR || p.startsWith(`${RESERVED_DIR}/`)) {
    throw invalidArgument(`${where}: path ${JSON.stringify(p.slice(0, 200))} is under the reserved ${RESERVED_DIR}/ (only ${INDEX_MANIFEST_PATH}, the first entry, is)`);
  }
  if (prev !== undefined && comparePaths(prev, p) >= 0) {
    const rule = comparePaths(prev, p) === 0 ? 'is repeated (each path is listed once)' : `comes after ${JSON.stringify(prev.slice(0, 200))} in the list but sorts before it (paths are in strictly increasing path order)`;
    throw invalidArgument(`${where}: path ${JSON.stringify(p.slice(0, 200))} ${rule}`);
  }
}

/**
 * A content digest names one content, so it has one size (and one stored
 * blob size): two files listing the same digest with different sizes would
 * show one size and read another.
 */
function checkOneSizePerContent(files: readonly IndexFile[]): void {
  const first = new Map<string, IndexFile>();
  const blobs = new Map<string, IndexFile>();
  for (const f of files) {
    const other = first.get(f.digest);
    if (!other) first.set(f.digest, f);
    else if (other.size !== f.size) {
      throw invalidArgument(
        `gear index: file ${JSON.stringify(f.path.slice(0, 200))}: ${f.digest} is ${f.size} bytes here but ${other.size} bytes at ${JSON.stringify(other.path.slice(0, 200))} (one content has one size)`,
      );
    }
    if (!f.blob) continue;
    const ob = blobs.get(f.blob.digest);
    if (!ob) blobs.set(f.blob.digest, f);
    else if (ob.blob!.size !== f.blob.size) {
      throw invalidArgument(
        `gear index: file ${JSON.stringify(f.path.slice(0, 200))}: blob ${f.blob.digest} is ${f.blob.size} bytes here but ${ob.blob!.size} bytes at ${JSON.stringify(ob.path.slice(0, 200))} (one blob has one size)`,
      );
    }
  }
}

/**
 * digest, size and blob of a file with content (a v1 `files` entry or a v2
 * tree entry); with `packs` (version 3), digest, size and its pack members.
 */
function validateContent(f: Record<string, unknown>, path: string, where: Where, packs?: readonly PackRef[]): IndexFile {
  if (typeof f.digest !== 'string' || !DIGEST_RE.test(f.digest)) {
    throw invalidArgument(`${where}: "digest" must be sha256:<64 lowercase hex>, not ${shown(f.digest)}`);
  }
  if (typeof f.size !== 'number' || !Number.isSafeInteger(f.size) || f.size <= 0) {
    throw invalidArgument(`${where}: "size" must be a whole number in 1…2^53−1, not ${shown(f.size)}`);
  }
  const file: IndexFile = { path, digest: f.digest, size: f.size };
  if (packs) return Object.assign(file, decodePackedContent(f, f.size, packs, where));
  if (f.blob !== undefined) {
    const b = f.blob as Record<string, unknown>;
    if (!b || typeof b !== 'object' || Array.isArray(b)) throw invalidArgument(`${where}: "blob" must be an object, not ${shown(b)}`);
    if (b.mediaType !== GearMediaType.FileGzip) {
      throw invalidArgument(`${where}: blob.mediaType must be ${GearMediaType.FileGzip}, not ${shown(b.mediaType)} (a newer format? upgrade gear on this node)`);
    }
    if (typeof b.digest !== 'string' || !DIGEST_RE.test(b.digest)) {
      throw invalidArgument(`${where}: blob.digest must be sha256:<64 lowercase hex>, not ${shown(b.digest)}`);
    }
    if (typeof b.size !== 'number' || !Number.isSafeInteger(b.size) || b.size <= 0) {
      throw invalidArgument(`${where}: blob.size must be a whole number in 1…2^53−1, not ${shown(b.size)}`);
    }
    file.blob = { mediaType: GearMediaType.FileGzip, digest: b.digest, size: b.size };
  }
  return file;
}

/** Decodes and validates manifest bytes (see validateIndexManifest). */
export function parseIndexManifest(bytes: Uint8Array): IndexManifest {
  if (bytes.length > MAX_MANIFEST_BYTES) throw invalidArgument(`gear index: ${INDEX_MANIFEST_PATH} is ${bytes.length} bytes, beyond the ${MAX_MANIFEST_BYTES} allowed`);
  let doc: unknown;
  try {
    doc = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw invalidArgument(`gear index: ${INDEX_MANIFEST_PATH} is not valid UTF-8 JSON: ${(err as Error).message}`, err);
  }
  return validateIndexManifest(doc, { consume: true });
}

/**
 * The canonical encoding: compact JSON, members in the order version,
 * location (registry, repository), packs (version 3: digest, size), then for
 * version 1 files (path, digest,
 * size, blob (mediaType, digest, size) when present), for versions 2 and 3 tree
 * (tree.ts; a regular file with content carries its digest, size and blob),
 * then prefetch (when not empty), no trailing newline. Equal manifests always
 * encode to equal bytes. Version 2 needs `tree`, and every file of `files`
 * must be a regular file of it.
 */
export function encodeIndexManifest(m: IndexManifest): Buffer {
  const parts = encodeIndexManifestParts(m);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/** Bytes of text gathered before they become one Buffer of encodeIndexManifestParts. */
const PART_CHARS = 1 << 20;

/**
 * encodeIndexManifest as a list of Buffers whose concatenation is the same
 * bytes. A version 2 tree is encoded entry by entry, so a million-entry index
 * never exists as one JSON document of objects nor as one string.
 */
export function encodeIndexManifestParts(m: IndexManifest): Buffer[] {
  if (!GEAR_FORMAT_VERSIONS.includes(m.version)) throw invalidArgument(`gear index: cannot write format version ${m.version}`);
  const doc: Record<string, unknown> = { version: m.version };
  if (m.location) doc.location = { registry: m.location.registry, repository: m.location.repository };
  if (m.version === 3) {
    if (!m.packs) throw invalidArgument('gear index: a version 3 manifest needs its packs');
    doc.packs = m.packs.map((p) => ({ digest: p.digest, size: p.size }));
    for (const f of m.files) {
      if (!f.member && !f.chunks) throw invalidArgument(`gear index: version 3 file ${JSON.stringify(f.path)} has no pack member or chunks`);
    }
  } else if (m.files.some((f) => f.member || f.chunks)) {
    throw invalidArgument(`gear index: pack members are version 3; this manifest is version ${m.version}`);
  }
  const tail = m.prefetch?.length ? `,"prefetch":${JSON.stringify([...m.prefetch])}}` : '}';
  if (m.version === 1) {
    doc.files = m.files.map((f) =>
      f.blob
        ? { path: f.path, digest: f.digest, size: f.size, blob: { mediaType: f.blob.mediaType, digest: f.blob.digest, size: f.blob.size } }
        : { path: f.path, digest: f.digest, size: f.size },
    );
    const head = JSON.stringify(doc);
    return [Buffer.from(head.slice(0, -1) + tail, 'utf8')];
  }
  if (!m.tree) throw invalidArgument(`gear index: a version ${m.version} manifest needs its tree`);
  const content = new Map(m.files.map((f) => [f.path, f]));
  // JSON.stringify({...doc, tree, prefetch}) piece by piece: the same bytes.
  const parts: Buffer[] = [];
  let text = `${JSON.stringify(doc).slice(0, -1)},"tree":[`;
  for (let i = 0; i < m.tree.length; i++) {
    const h = m.tree[i]!;
    const p = h.path.replace(/\/+$/, '');
    const f = h.type === 'file' ? content.get(p) : undefined;
    if (f) content.delete(p);
    text += (i === 0 ? '' : ',') + JSON.stringify(encodeTreeEntry(h, f));
    if (text.length >= PART_CHARS) {
      parts.push(Buffer.from(text, 'utf8'));
      text = '';
    }
  }
  if (content.size > 0) {
    throw invalidArgument(`gear index: file ${JSON.stringify([...content.keys()][0])} is not a regular file of the tree`);
  }
  parts.push(Buffer.from(`${text}]${tail}`, 'utf8'));
  return parts;
}
