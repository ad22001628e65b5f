/**
 * Index forms, as the layer store meets them: which form new index layers
 * get (GEAR_INDEX_FORM), whether a tree extracted by someone else is a Gear
 * index form, and the files an index manifest asks to prefetch.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { errnoCode, invalidArgument } from '../errors.js';
import type { IndexManifest } from '../index/manifest.js';

/** GEAR_INDEX_FORM (auto | image | dir); anything else is refused with the accepted values. */
export function indexFormFromEnv(): 'auto' | 'image' | 'dir' {
  const v = process.env.GEAR_INDEX_FORM;
  if (v === undefined || v === '') return 'auto';
  if (v === 'auto' || v === 'image' || v === 'dir') return v;
  throw invalidArgument(`GEAR_INDEX_FORM=${JSON.stringify(v)}: expected auto, image or dir`);
}

/** The files a manifest lists for prefetch, in its order. */
export function prefetchFilesOf(manifest: IndexManifest): Array<{ digest: string; size: number }> {
  const byPath = new Map(manifest.files.map((f) => [f.path, f]));
  return (manifest.prefetch ?? []).map((p) => byPath.get(p)!).map((f) => ({ digest: f.digest, size: f.size }));
}

/**
 * True when an extracted tree carries what only a Gear index layer tar makes
 * (docs/format.md 3.1): `.gear/` holding nothing but `index.json`, a regular
 * file of mode 0444 and mtime 0. The tar's entry order, which marks an index
 * layer for certain, is lost once someone else extracted it; a plain image
 * that merely has a file at /.gear/index.json stays a plain layer.
 */
export async function hasIndexFormSignature(diff: string): Promise<boolean> {
  try {
    const names = await fs.readdir(path.join(diff, '.gear'));
    if (names.length !== 1 || names[0] !== 'index.json') return false;
    const st = await fs.lstat(path.join(diff, '.gear', 'index.json'));
    return st.isFile() && (st.mode & 0o7777) === 0o444 && st.mtimeMs === 0;
  } catch (err) {
    if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') return false;
    throw err;
  }
}
