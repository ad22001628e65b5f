/**
 * `gear prefetch`: give a Gear image a prefetch list (docs/format.md §3.3),
 * the files a node fetches in the background as soon as it has pulled the
 * index, instead of one at a time when a container opens them.
 *
 * The list is recorded from a real run: on a node whose pool started empty
 * and whose daemon runs without read-ahead (GEAR_READ_AHEAD=0), run the
 * image's task once; the pool then holds exactly the files the task opened,
 * each written when it was first needed (`--from-pool`). With read-ahead on,
 * it also holds the pack neighbours fetched along, and a notice says so
 * (core/lazy/read-ahead-note.ts). Or the list is given as paths (`--list`).
 *
 * Versions 1 and 2: only the index layer changes: the Gear files are already
 * in the repository, so this pushes a new index layer, config and manifest
 * (and the keep-alive manifests of the new image digest) in seconds.
 * Version 3: the listed files are also packed again, in list order, into new
 * packs at the front (prefetch-repack.ts), so a node's prefetch reads a few
 * contiguous ranges; every other file keeps its range.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { invalidArgument } from '../core/errors.js';
import { notedReadAhead } from '../core/lazy/read-ahead-note.js';
import { formatSize } from '../core/pool/size.js';
import { readIndexLayer } from '../core/index/index-layer.js';
import type { IndexManifest } from '../core/index/manifest.js';
import { publishGearImage, publishedSummary, withIndexLayer } from './publish.js';
import type { ProgressEvent } from './types.js';
import type { Destination } from './destination.js';
import { layerTar, type SourceImage } from './source.js';
import { repackPrefetch, type RepackStats } from './prefetch-repack.js';
import { tmpdir } from 'node:os';

export interface PrefetchSummary {
  source: string;
  destination: string;
  manifestDigest: string;
  indexDigest: string;
  indexDiffId: string;
  /** Paths in the new list. */
  prefetch: number;
  /** Their content bytes (distinct contents). */
  prefetchBytes: number;
  /** Files of the image. */
  files: number;
  /** Version 3: the new packs holding the listed files. */
  repacked?: RepackStats;
  /** What the user should know about the list (e.g. a pool recorded with read-ahead on). */
  notices: string[];
  seconds: number;
}

/** Paths from a list file: one per line, a leading "/" dropped; blank lines and "#" comments ignored. */
export async function readPathList(file: string): Promise<string[]> {
  const text = await readFile(file, 'utf8');
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'))
    .map((l) => l.replace(/^\/+/, ''));
}

/**
 * The files of `manifest` present in a Gear pool directory (a node's
 * <root>/pool), oldest first: the order in which that node first needed
 * them. One path per content (the first in the index).
 */
export async function pathsFromPool(poolDir: string, manifest: IndexManifest): Promise<string[]> {
  const shaDir = join(poolDir, 'sha256');
  const firstPath = new Map<string, string>();
  for (const f of manifest.files) if (!firstPath.has(f.digest)) firstPath.set(f.digest, f.path);
  let shards: string[];
  try {
    shards = await readdir(shaDir);
  } catch (err) {
    throw invalidArgument(`${poolDir} is not a Gear pool (no sha256/ directory): ${(err as Error).message}`);
  }
  const found: Array<{ path: string; mtime: number }> = [];
  for (const shard of shards) {
    if (!/^[0-9a-f]{2}$/.test(shard)) continue;
    for (const name of await readdir(join(shaDir, shard))) {
      const p = firstPath.get(`sha256:${name}`);
      if (!p) continue;
      const st = await stat(join(shaDir, shard, name));
      if (st.isFile()) found.push({ path: p, mtime: st.mtimeMs });
    }
  }
  return found.sort((a, b) => a.mtime - b.mtime || (a.path < b.path ? -1 : 1)).map((f) => f.path);
}

/**
 * What the user should know about a list of `manifest`'s files taken from
 * `poolDir`: the daemon that filled it ran with read-ahead on, so the pool
 * also holds the pack neighbours fetched along with the files the task opened.
 */
export async function poolListNotices(poolDir: string, manifest: IndexManifest): Promise<string[]> {
  // Read-ahead brings along pack members only (format v3).
  if (!manifest.packs?.length) return [];
  const readAhead = await notedReadAhead(poolDir);
  if (!readAhead) return [];
  return [
    `${poolDir} was filled by a daemon with read-ahead on (${formatSize(readAhead)} windows): besides the files the task opened, it holds their pack neighbours fetched along, and so does the list (every node then prefetches them too). ` +
      'For a list of the opened files only, empty the pool (gear cache prune --all), start the daemon with GEAR_READ_AHEAD=0, run the task once and run gear prefetch again.',
  ];
}

/**
 * Rewrites the Gear image `src` into `dst` with `pick(manifest)` as its
 * prefetch list (empty: no list). Throws InvalidArgument when src is not a
 * Gear image or the list names paths that are not files of the image.
 */
export async function setPrefetch(
  src: SourceImage,
  dst: Destination,
  pick: (manifest: IndexManifest) => Promise<string[]>,
  opts: { progress?: (e: ProgressEvent) => void; tmpDir?: string } = {},
): Promise<PrefetchSummary> {
  const t0 = process.hrtime.bigint();
  if (src.layers.length !== 1) {
    throw invalidArgument(`${src.description} has ${src.layers.length} layers: not a Gear image (make one with gear convert)`);
  }
  let layer: Awaited<ReturnType<typeof readIndexLayer>>;
  try {
    layer = await readIndexLayer(layerTar(src.layers[0]!));
  } catch (err) {
    throw invalidArgument(`${src.description}: its layer is not a Gear index (make one with gear convert): ${(err as Error).message}`, err);
  }
  const { manifest, entries } = layer;
  const wanted = await pick(manifest);
  const byPath = new Map(manifest.files.map((f) => [f.path, f]));
  const unknown = wanted.filter((p) => !byPath.has(p));
  if (unknown.length) {
    const shown = unknown.slice(0, 5).map((p) => JSON.stringify(p)).join(', ');
    throw invalidArgument(`${unknown.length} listed paths are not regular files with content in ${src.description}: ${shown}${unknown.length > 5 ? ', …' : ''}`);
  }
  const list = [...new Set(wanted)];
  const next: IndexManifest = { ...manifest };
  if (list.length) next.prefetch = list;
  else delete next.prefetch;
  let repack: RepackStats | undefined;
  if (next.version === 3 && list.length) {
    // Version 3: the listed files move, in list order, into new packs at the front (contiguous ranges for the prefetch).
    next.files = next.files.map((f) => ({ ...f }));
    repack = await repackPrefetch(next, list, src, dst, { tmpDir: opts.tmpDir ?? tmpdir(), ...(opts.progress ? { progress: opts.progress as never } : {}) });
  }
  const contents = new Map<string, number>();
  for (const p of list) {
    const f = byPath.get(p)!;
    contents.set(f.digest, f.size);
  }
  const published = await publishGearImage(
    dst,
    next,
    entries,
    withIndexLayer(src.config),
    { tmpDir: opts.tmpDir ?? tmpdir(), filesPerManifest: 10_000, account: () => undefined, progress: opts.progress ?? (() => undefined) },
  );
  return {
    ...publishedSummary(src, dst, published),
    prefetch: list.length,
    prefetchBytes: [...contents.values()].reduce((a, b) => a + b, 0),
    files: manifest.files.length,
    ...(repack ? { repacked: repack } : {}),
    notices: [],
    seconds: Number(process.hrtime.bigint() - t0) / 1e9,
  };
}
