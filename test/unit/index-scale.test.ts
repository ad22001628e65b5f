/**
 * An index of hundreds of thousands of entries goes through the real path of
 * a pull: write the index layer (format 2 and 1), read and validate it
 * (readIndexLayer), build the tree (indexTreeFromEntriesSliced), build the
 * EROFS image and mount it. Regression: `entries.push(...manifest.tree)`
 * overflowed the stack ("Maximum call stack size exceeded") from ~125k
 * entries, so such an image converted but could not be pulled.
 * Needs root for the mount (skipped step otherwise is reported, not hidden).
 */
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import ts from 'typescript';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { readIndexLayer, writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexFile, IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { buildErofsImageSliced } from '../../src/core/layers/erofs-image.js';
import { indexTreeFromEntriesSliced, mountIndexImage, probeIndexImages } from '../../src/core/layers/index-image.js';
import { constants, native } from '../../src/core/sys/native.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { indexTarHeader } from './fixtures/tarbuild.js';

const ENTRIES = 200_000;
const PER_DIR = 1000;
const DIGESTS = ['a', 'b', 'c'].map((c) => `sha256:${c.repeat(64)}`);

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-scale-'));
});
afterEach(async () => {
  for (const m of mountsUnder(dir)) native.umount2(m.mountPoint, constants.MNT_DETACH);
  await fs.rm(dir, { recursive: true, force: true });
});

/** ENTRIES paths: d0000/ … with PER_DIR files each, every other file with content (3 distinct digests). */
function tree(): { entries: TarHeader[]; files: IndexFile[] } {
  const entries: TarHeader[] = [];
  const files: IndexFile[] = [];
  const dirs = Math.ceil(ENTRIES / (PER_DIR + 1));
  for (let d = 0; d < dirs && entries.length < ENTRIES; d++) {
    const dname = `d${String(d).padStart(4, '0')}`;
    entries.push(indexTarHeader(dname, 'dir'));
    for (let f = 0; f < PER_DIR && entries.length < ENTRIES; f++) {
      const p = `${dname}/f${String(f).padStart(4, '0')}`;
      entries.push(indexTarHeader(p, 'file'));
      if (f % 2 === 0) files.push({ path: p, digest: DIGESTS[f % 3]!, size: 1 + (f % 3) });
    }
  }
  return { entries, files };
}

async function* bytesOf(gen: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  // Re-chunk as a network stream would deliver it.
  for await (const b of gen) for (let i = 0; i < b.length; i += 64 * 1024) yield b.subarray(i, i + 64 * 1024);
}

describe(`an index of ${ENTRIES.toLocaleString('en')} entries`, () => {
  // Format 2 only: a format 1 layer of this size is 200,000 tar headers (15 s here), and its reader never had the spread.
  it.each([2])('format %i: reads, validates, builds its tree and an EROFS image that mounts', async (version) => {
    const { entries, files } = tree();
    const manifest: IndexManifest = { version, files };
    const layer = await readIndexLayer(bytesOf(writeIndexLayer(manifest, entries)));
    expect(layer.entries.length).toBe(ENTRIES);
    expect(layer.manifest.files.length).toBe(files.length);

    const { root, result } = await indexTreeFromEntriesSliced(layer.manifest, layer.entries);
    expect(result.files).toBe(files.length);
    expect(result.blobs.length).toBe(3);
    expect(root.children!.size).toBe(Math.ceil(ENTRIES / (PER_DIR + 1)));

    const img = await buildErofsImageSliced(root);
    const why = probeIndexImages(dir);
    expect(why, 'this kernel must mount EROFS image files').toBeUndefined();
    const file = path.join(dir, 'index.erofs');
    fsSync.writeFileSync(file, img);
    const mnt = path.join(dir, 'mnt');
    mountIndexImage(file, mnt);
    let seen = 0;
    for (const d of fsSync.readdirSync(mnt)) seen += 1 + fsSync.readdirSync(path.join(mnt, d)).length;
    expect(seen).toBe(ENTRIES);
    const last = entries[entries.length - 1]!;
    expect(fsSync.lstatSync(path.join(mnt, last.path)).isFile()).toBe(true);
    const withContent = files[files.length - 1]!;
    expect(fsSync.statSync(path.join(mnt, withContent.path)).size).toBe(withContent.size);
  }, 240_000);
});

/** Every .ts file under dir. */
function sources(d: string): string[] {
  return fsSync.readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sources(path.join(d, e.name)) : e.name.endsWith('.ts') ? [path.join(d, e.name)] : []));
}

describe('src/ spreads no array into a call', () => {
  it('has no f(...xs) (push, Math.max, String.fromCharCode…): V8 puts every element on the stack', () => {
    const root = path.resolve(import.meta.dirname, '../../src');
    const found: string[] = [];
    for (const file of sources(root)) {
      const sf = ts.createSourceFile(file, fsSync.readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true);
      const visit = (n: ts.Node): void => {
        if ((ts.isCallExpression(n) || ts.isNewExpression(n)) && n.arguments?.some((a) => ts.isSpreadElement(a))) {
          found.push(`${path.relative(root, file)}:${sf.getLineAndCharacterOfPosition(n.getStart()).line + 1}: ${n.getText().slice(0, 80)}`);
        }
        ts.forEachChild(n, visit);
      };
      visit(sf);
    }
    expect(found).toEqual([]);
  });
});

describe('the manifest encoded in parts', () => {
  it.each([1, 2])('format %i: the same bytes as JSON.stringify of the whole document, across part boundaries', async (version) => {
    const { entries, files } = tree();
    const some = entries.slice(0, 30_000); // > 1 MiB of JSON: several parts
    const inSome = new Set(some.map((e) => e.path));
    const listed = files.filter((f) => inSome.has(f.path));
    const m: IndexManifest = { version, location: { registry: 'r.example:5000', repository: 'team/app' }, files: listed, prefetch: [listed[3]!.path, listed[1]!.path] };
    const { encodeIndexManifest, encodeIndexManifestParts } = await import('../../src/core/index/manifest.js');
    const { encodeTreeEntry } = await import('../../src/core/index/tree.js');
    const byPath = new Map(listed.map((f) => [f.path, f]));
    const doc: Record<string, unknown> = { version, location: m.location };
    if (version === 1) doc.files = listed.map((f) => ({ path: f.path, digest: f.digest, size: f.size }));
    else doc.tree = some.map((h) => encodeTreeEntry(h, h.type === 'file' ? byPath.get(h.path) : undefined));
    doc.prefetch = m.prefetch;
    const expected = Buffer.from(JSON.stringify(doc));
    const parts = encodeIndexManifestParts(version === 2 ? { ...m, tree: some } : m);
    if (version === 2) expect(parts.length).toBeGreaterThan(1);
    expect(Buffer.concat(parts).equals(expected)).toBe(true);
    expect(encodeIndexManifest(version === 2 ? { ...m, tree: some } : m).equals(expected)).toBe(true);
  });
});

describe('validateIndexManifest and the caller\'s document', () => {
  it('leaves a document it was given unchanged; parseIndexManifest (its own document) gives the same result', async () => {
    const { parseIndexManifest, validateIndexManifest } = await import('../../src/core/index/manifest.js');
    const doc = { version: 2, tree: [{ path: 'a', type: 'dir' }, { path: 'a/b', type: 'file', digest: DIGESTS[0], size: 3 }] };
    const copy = JSON.parse(JSON.stringify(doc)) as unknown;
    const m = validateIndexManifest(doc);
    expect(doc).toEqual(copy);
    const parsed = parseIndexManifest(Buffer.from(JSON.stringify(doc)));
    expect(parsed.tree).toEqual(m.tree);
    expect(parsed.files).toEqual(m.files);
  });
});
