/**
 * The Gear index layer: an uncompressed tar whose first entry is the index
 * manifest (`.gear/index.json`). In format version 1 the flattened tree of
 * the image follows as tar entries, every regular file with an empty body; in
 * version 2 the manifest holds the tree and is the only entry. Either way a
 * reader gets the same entries. See docs/format.md.
 *
 * Writing is deterministic: the same manifest and entries give the same bytes.
 * Reading validates the manifest against the tar (hostile input).
 */
import { invalidArgument } from '../errors.js';
import { checkListedPath, encodeIndexManifest, encodeIndexManifestParts, INDEX_MANIFEST_PATH, MAX_MANIFEST_BYTES, parseIndexManifest, type IndexManifest } from './manifest.js';
import { encodeTarHeader, readTar, tarPadding, tarTrailer, type TarHeader, type TarLimits, DEFAULT_TAR_LIMITS } from './tar.js';

/** The tar header of the manifest entry: fixed metadata, so it never varies between runs. */
export function manifestHeader(size: number): TarHeader {
  return {
    path: INDEX_MANIFEST_PATH,
    type: 'file',
    size,
    mode: 0o444,
    uid: 0,
    gid: 0,
    uname: '',
    gname: '',
    mtime: 0,
    mtimeNsec: 0,
    linkname: '',
    devmajor: 0,
    devminor: 0,
    xattrs: new Map(),
  };
}

/** The path an entry has in an index layer: no trailing slash, no "./" prefix. */
function entryPath(h: TarHeader): string {
  return h.path.replace(/\/+$/, '');
}

/**
 * Checks that `entries` and `manifest` form a valid index layer: entry paths
 * clean, unique, in `comparePaths` order, outside `.gear/`, regular files
 * with size 0, and every manifest path naming a regular-file entry (not a
 * hard link). Throws InvalidArgument.
 */
export function checkIndexEntries(manifest: IndexManifest, entries: Iterable<TarHeader>): void {
  const listed = new Map(manifest.files.map((f) => [f.path, false]));
  const files = new Set<string>();
  let prev: string | undefined;
  for (const h of entries) {
    checkEntry(h, listed, files, prev);
    prev = entryPath(h);
  }
  finishCheck(listed);
}

function checkEntry(h: TarHeader, listed: Map<string, boolean>, files: Set<string>, prev: string | undefined): void {
  const p = entryPath(h);
  checkListedPath(p, prev, 'gear index layer: entry');
  if (h.type === 'file') {
    if (h.size !== 0) throw invalidArgument(`gear index layer: entry ${JSON.stringify(p.slice(0, 200))}: a regular file of ${h.size} bytes; in an index layer regular files are empty (their content is in the manifest)`);
    if (listed.has(p)) listed.set(p, true);
  } else if (listed.has(p)) {
    throw invalidArgument(`gear index layer: entry ${JSON.stringify(p.slice(0, 200))}: listed in the manifest with content, but a ${h.type}, not a regular file`);
  }
  if (h.type === 'link') {
    const target = h.linkname.replace(/\/+$/, '');
    if (!files.has(target)) {
      throw invalidArgument(`gear index layer: entry ${JSON.stringify(p.slice(0, 200))}: hard link to ${JSON.stringify(target.slice(0, 200))}, which is not an earlier non-directory entry`);
    }
  } else if (h.type !== 'dir') {
    files.add(p); // hard links may point at files, symlinks, devices and fifos
  }
}

function finishCheck(listed: Map<string, boolean>): void {
  for (const [p, seen] of listed) {
    if (!seen) throw invalidArgument(`gear index layer: the manifest lists ${JSON.stringify(p.slice(0, 200))}, but the tar has no regular file of that path`);
  }
}

/**
 * Encodes an index layer (uncompressed tar) chunk by chunk, in the manifest's
 * format version. `entries` must already be in `comparePaths` order; they are
 * checked against the manifest as they go (see checkIndexEntries), so a bad
 * input throws before the end. Version 2 ignores `manifest.tree` and writes
 * `entries` as the tree.
 */
export async function* writeIndexLayer(manifest: IndexManifest, entries: Iterable<TarHeader>): AsyncGenerator<Buffer> {
  if (manifest.version !== 1) {
    const tree = [...entries];
    checkIndexEntries(manifest, tree);
    // In parts: a million-entry tree is never one string or one document of objects.
    const parts = encodeIndexManifestParts({ ...manifest, tree });
    const length = parts.reduce((n, b) => n + b.length, 0);
    if (length > MAX_MANIFEST_BYTES) throw invalidArgument(`gear index: manifest of ${length} bytes is too large`);
    yield encodeTarHeader(manifestHeader(length));
    yield* parts;
    yield Buffer.concat([tarPadding(length), tarTrailer()]);
    return;
  }
  const json = encodeIndexManifest(manifest);
  if (json.length > MAX_MANIFEST_BYTES) throw invalidArgument(`gear index: manifest of ${json.length} bytes is too large`);
  yield Buffer.concat([encodeTarHeader(manifestHeader(json.length)), json, tarPadding(json.length)]);
  const listed = new Map(manifest.files.map((f) => [f.path, false]));
  const files = new Set<string>();
  let prev: string | undefined;
  let batch: Buffer[] = [];
  let batchBytes = 0;
  for (const h of entries) {
    checkEntry(h, listed, files, prev);
    prev = entryPath(h);
    const b = encodeTarHeader(h);
    batch.push(b);
    batchBytes += b.length;
    if (batchBytes >= 256 * 1024) {
      yield Buffer.concat(batch);
      batch = [];
      batchBytes = 0;
    }
  }
  finishCheck(listed);
  batch.push(tarTrailer());
  yield Buffer.concat(batch);
}

/** A parsed, validated index layer. */
export interface IndexLayer {
  manifest: IndexManifest;
  /** The tree: the entries after the manifest (version 1) or its `tree` (version 2), in path order. */
  entries: TarHeader[];
  /** Size of the manifest entry's body: the only bytes of file content in the tar. */
  manifestBytes: number;
}

/**
 * Reads and validates an index layer from an uncompressed tar stream: the
 * first entry must be `.gear/index.json`; the manifest and the entries must
 * agree (checkIndexEntries). Throws InvalidArgument (or FailedPrecondition
 * for an unsupported format version).
 */
export async function readIndexLayer(
  source: AsyncIterable<Uint8Array>,
  limits: TarLimits = DEFAULT_TAR_LIMITS,
  /** Called with the validated manifest as soon as it is read, before the other entries. */
  onManifest?: (manifest: IndexManifest) => void,
): Promise<IndexLayer> {
  let manifest: IndexManifest | undefined;
  let manifestBytes = 0;
  let entries: TarHeader[] = [];
  const listed = new Map<string, boolean>();
  const files = new Set<string>();
  let prev: string | undefined;
  for await (const e of readTar(source, limits)) {
    if (manifest === undefined) {
      if (e.header.path !== INDEX_MANIFEST_PATH) {
        throw invalidArgument(`not a gear index layer: first entry is ${JSON.stringify(e.header.path.slice(0, 200))}, not ${INDEX_MANIFEST_PATH}`);
      }
      if (e.header.type !== 'file') throw invalidArgument(`gear index layer: the first entry ${INDEX_MANIFEST_PATH} is a ${e.header.type}; the manifest is a regular file`);
      if (e.header.size > MAX_MANIFEST_BYTES) throw invalidArgument(`gear index: ${INDEX_MANIFEST_PATH} is ${e.header.size} bytes, beyond the ${MAX_MANIFEST_BYTES} allowed`);
      const chunks: Buffer[] = [];
      for await (const c of e.body()) chunks.push(c);
      manifestBytes = e.header.size;
      manifest = parseIndexManifest(Buffer.concat(chunks));
      if (manifest.tree) {
        // parseIndexManifest checked the tree as checkIndexEntries would: paths, order, .gear/, hard links.
        // (Taken as it is: a spread into push() overflows the stack from ~125k entries.)
        entries = manifest.tree;
      } else {
        for (const f of manifest.files) listed.set(f.path, false);
      }
      onManifest?.(manifest);
      continue;
    }
    if (manifest.tree) {
      throw invalidArgument(`gear index layer: version ${manifest.version} holds only ${INDEX_MANIFEST_PATH}, but an entry ${JSON.stringify(e.header.path.slice(0, 200))} follows it`);
    }
    checkEntry(e.header, listed, files, prev);
    prev = entryPath(e.header);
    entries.push(e.header);
  }
  if (manifest === undefined) throw invalidArgument('not a gear index layer: empty tar');
  if (!manifest.tree) finishCheck(listed);
  return { manifest, entries, manifestBytes };
}

/** True when the first bytes of an uncompressed tar are the header of `.gear/index.json`. */
export function looksLikeIndexLayer(firstBlock: Uint8Array): boolean {
  if (firstBlock.length < 512) return false;
  const name = Buffer.from(firstBlock.subarray(0, 100));
  const nul = name.indexOf(0);
  return (nul < 0 ? name : name.subarray(0, nul)).toString('utf8') === INDEX_MANIFEST_PATH;
}
