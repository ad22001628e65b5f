/**
 * The first pull after a start ran the index code cold: V8 had compiled none
 * of the manifest's parse and checks, the tree and the EROFS image, so the
 * ApplyDiff of a 6,600-file index (python3) took 270-310 ms where a warm
 * daemon takes 100-140 ms (bench/micro/apply-index.mjs), and a profile's
 * prefetch started that much later. warmUpIndexCode() runs a synthetic
 * version 3 index layer through the same functions (WARM_UP_ROUNDS times), at
 * start, in memory (nothing is written), in slices that give the event loop a
 * turn.
 *
 * It helps the first pull after each start only (a running daemon's code is
 * warm after its first pull); an ApplyDiff that arrives meanwhile aborts it.
 */
import { createHash } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { setImmediate as turn } from 'node:timers/promises';
import { readIndexLayer, writeIndexLayer } from '../index/index-layer.js';
import { comparePaths, GEAR_FORMAT_VERSION, type IndexFile, type IndexManifest } from '../index/manifest.js';
import type { TarHeader } from '../index/tar.js';
import { buildErofsImageSliced } from './erofs-image.js';
import { indexTreeFromEntriesSliced } from './index-image.js';
import { summarize } from './index-entry.js';
import { BlobCatalog } from '../lazy/catalog.js';
import { describeError } from '../errors.js';
import type { Logger } from '../log.js';

/** Files of the synthetic index: enough for V8 to optimize the per-entry functions (measured: 2,000 does). */
export const WARM_UP_FILES = 2000;
/**
 * Times it runs through, for ~210 ms more of background work at start per
 * extra round. The evidence is mixed (3 fresh processes per arm, first apply
 * of python3's index after a 300 ms pause): one script measured one round
 * 233-242 ms against three 179-192 (warm: 105-145), and three rounds 217-231
 * against nine 151-180; `WARM=1 WARM_ROUNDS=1|3 WARM_PAUSE_MS=300 node
 * bench/micro/apply-index.mjs` gave 224-318 against 225-249. One round of
 * 6,000 files or two of 4,000 did no better than three of 2,000.
 */
export const WARM_UP_ROUNDS = 3;

const header = (path: string, type: TarHeader['type'], mode: number, linkname = ''): TarHeader => ({
  path,
  type,
  size: 0,
  mode,
  uid: 0,
  gid: 0,
  uname: '',
  gname: '',
  mtime: 1_700_000_000,
  mtimeNsec: 0,
  linkname,
  devmajor: 0,
  devminor: 0,
  xattrs: new Map(),
});

/** A version 3 index like a converted image's: directories, files in two packs, one chunked file, symlinks, a prefetch list. */
export function syntheticIndex(files = WARM_UP_FILES): { manifest: IndexManifest; entries: TarHeader[] } {
  const entries: TarHeader[] = [];
  const listed: IndexFile[] = [];
  const digest = (s: string): string => `sha256:${createHash('sha256').update(s).digest('hex')}`;
  const dirs = Math.max(1, Math.ceil(files / 40));
  entries.push(header('usr', 'dir', 0o755), header('usr/lib', 'dir', 0o755));
  let offset = 0;
  for (let d = 0; d < dirs; d++) {
    const dir = `usr/lib/d${d}`;
    entries.push(header(dir, 'dir', 0o755));
    for (let i = d; i < files; i += dirs) {
      const path = `${dir}/m${i}.py`;
      const size = 200 + ((i * 7919) % 30_000);
      const length = Math.ceil(size / 3);
      entries.push(header(path, 'file', 0o644));
      listed.push({ path, digest: digest(path), size, member: { pack: i % 2, offset: offset, length, encoding: 'zstd' } });
      offset += length;
      if (i % 50 === 0) entries.push(header(`${dir}/l${i}`, 'symlink', 0o777, `m${i}.py`));
    }
  }
  // One big file in chunks of 1 MiB (its chunks after every member of pack 1).
  const big = 'usr/lib/big.so';
  const chunkSize = 1024 * 1024;
  const size = 9 * chunkSize + 123;
  const chunks = [];
  for (let c = 0; c * chunkSize < size; c++) {
    const length = Math.ceil(Math.min(chunkSize, size - c * chunkSize) / 2);
    chunks.push({ pack: 1, offset, length, encoding: 'zstd' as const, digest: digest(`${big}#${c}`) });
    offset += length;
  }
  entries.push(header(big, 'file', 0o755));
  listed.push({ path: big, digest: digest(big), size, chunkSize, chunks });
  entries.sort((a, b) => comparePaths(a.path, b.path));
  listed.sort((a, b) => comparePaths(a.path, b.path));
  const packSize = offset + 1;
  return {
    manifest: {
      version: GEAR_FORMAT_VERSION,
      location: { registry: 'warm-up.invalid', repository: 'gear/warm-up' },
      packs: [
        { digest: digest('pack 0'), size: packSize },
        { digest: digest('pack 1'), size: packSize },
      ],
      files: listed,
      prefetch: listed.filter((_, i) => i % 5 === 0).map((f) => f.path),
    },
    entries,
  };
}

/**
 * Runs a synthetic index through the code of an index layer's ApplyDiff:
 * the tar, the manifest's parse and checks, the tree, the EROFS image (in
 * memory), the summary and a catalog of it. Resolves with the milliseconds it took, or
 * undefined when `signal` aborted it first.
 */
export async function warmUpIndexCode(signal?: AbortSignal, files = WARM_UP_FILES, rounds = WARM_UP_ROUNDS): Promise<number | undefined> {
  const t0 = performance.now();
  const { manifest, entries } = syntheticIndex(files);
  const tar: Buffer[] = [];
  for await (const chunk of writeIndexLayer(manifest, entries)) tar.push(chunk);
  for (let round = 0; round < rounds; round++) {
    if (signal?.aborted) return undefined;
    await turn();
    const layer = await readIndexLayer(
      (async function* () {
        yield* tar;
      })(),
    );
    if (signal?.aborted) return undefined;
    await turn();
    const { root } = await indexTreeFromEntriesSliced(layer.manifest, layer.entries);
    if (signal?.aborted) return undefined;
    await buildErofsImageSliced(root);
    // What the store does with the summary next: the catalog of a lazy store.
    new BlobCatalog().addIndex('warm-up', layer.manifest.location, summarize(layer.manifest));
  }
  return performance.now() - t0;
}

/** Starts warmUpIndexCode in the background (its end logged); abort the controller to stop it (an ApplyDiff, close). */
export function startIndexWarmUp(log?: Logger): AbortController {
  const ac = new AbortController();
  // After the current turn: the caller (the store's open) answers first.
  turn()
    .then(() => warmUpIndexCode(ac.signal))
    .then(
      (ms) => ms !== undefined && log?.debug({ ms: Math.round(ms) }, 'index code warmed up'),
      (err: unknown) => log?.warn({ err: describeError(err) }, 'index code warm-up failed (the first pull runs it cold)'),
    );
  return ac;
}
