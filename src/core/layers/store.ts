/**
 * The layer store: levels 2 and 3 of DESIGN.md, laid out like Docker's
 * overlay2 so that ordinary layers behave exactly as they do there.
 *
 *   ROOT/layers/<id>/layer.json   the record (LayerRecord), written atomically
 *   ROOT/layers/<id>/diff/        the layer's own content (overlay upper or lower dir)
 *   ROOT/layers/<id>/work/        overlay workdir (read-write layers)
 *   ROOT/layers/<id>/merged/      mount point of the merged view
 *   ROOT/layers/<id>/applying     present while applyDiff runs
 *   ROOT/layers/<id>/index/       a Gear index layer only: the metacopy tree (index-dir.ts), or
 *                                 the mount point of index.erofs, the same tree as one EROFS image
 *                                 (index-image.ts; kernels with file-backed EROFS mounts)
 *   ROOT/layers/<id>/index.tar    a Gear index layer only, until its first Get(): the layer tar,
 *                                 extracted into diff/ (the index form) when first asked for
 *   ROOT/l/<LINK> -> ../layers/<id>/diff   short names keep mount options short
 *                    (-> ../layers/<id>/index for an index layer: what layers above it see)
 *   ROOT/pool/, ROOT/miss/         the lazy path's data-only layers (pool, miss filesystem)
 *
 * Mounts whose lower chain contains an index layer add the data-only layers
 * (`lowerdir=…::pool::miss`) and `metacopy=on,redirect_dir=on,index=off`; they
 * are mounted and unmounted on a libuv worker thread (native mountAsync),
 * because overlay queries the FUSE layer (statfs, lookups) while mounting and
 * this process's JS thread serves it. Every other mount keeps exactly
 * overlay2's options.
 *
 * Crash safety: a layer is built in layers/.tmp-* and renamed into place; a
 * removal renames it to layers/.trash-* first. open() repairs whatever a
 * kill -9 left: temporary and trash dirs, layers whose applyDiff never
 * finished, missing or dangling links, and mounts of layers that are gone.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import type { Logger } from 'pino';
import { applyLayer } from '../archive/apply.js';
import type { Change } from '../archive/changes.js';
import { treeChanges } from '../archive/changes.js';
import type { OverlayLayerPaths } from '../archive/overlaywalk.js';
import { changesSize, exportChanges, overlayDiff, overlayDiffSize } from '../archive/export.js';
import { alreadyExists, describeError, errnoCode, failedPrecondition, GearError, invalidArgument, notFound, unavailable } from '../errors.js';
import { emptyDir, pathExists, syncDir, writeFileAtomic } from '../sys/fsutil.js';
import { KeyedMutex } from '../sys/keyed-mutex.js';
import { LayerActivity } from './layer-activity.js';
import { peekHead } from './peek-head.js';
import { isValidLayerId, MAX_LAYER_DEPTH, newLink, parseRecord, pointLink, repairLinks, validateLayerId } from './records.js';
import type { MetricsServer } from '../metrics/server.js';
import { StoreStats } from './store-stats.js';
import { hasIndexFormSignature, indexFormFromEnv, prefetchFilesOf } from './index-form.js';
import { constants, native } from '../sys/native.js';
import { isMountPoint, mountOverlay, mountsUnder, overlayData, readMounts, unmount, unmountUnder, MAX_MOUNT_DATA, type OverlayOptions } from '../sys/mounts.js';
import { bounded } from '../abort.js';
import type { LazyOptions, LazyRuntime } from '../lazy/runtime.js';
import { attachLazyRuntime, ensureMissDir, backingFilesystem, indexLayersInUse } from './lazy-attach.js';
import { ResumeQueue, type ResumeFile } from '../lazy/resume.js';
import { LayerFetches } from '../lazy/layer-fetches.js';
import type { Prefetcher } from '../lazy/prefetch.js';
import { layerBytes } from '../archive/tarreader.js';
import { RESERVED_DIR } from '../index/manifest.js';
import { createReadStream } from 'node:fs';
import { applyIndexLayer, buildIndexDir, buildIndexDirFromEntries, headIsIndexLayer, INDEX_TAR, readIndexManifest } from './index-dir.js';
import { Phases } from './phases.js';
import { startIndexWarmUp } from './warm-up.js';
import { PendingImages, rebuildMissingImages } from './pending-images.js';
import { INDEX_IMAGE, indexTreeFromDir, indexTreeFromEntries, mountIndexImage, probeIndexImages, writeIndexImage } from './index-image.js';
import type { IndexManifest } from '../index/manifest.js';

export { validateLayerId } from './records.js';
import type { IndexDirResult } from './index-dir.js';
import { checkKnownSizes } from './index-entry.js';
import type { ApplyOptions, CreateOptions, GearLayerInfo, IndexLayerAdoption, LayerKind, LayerRecord, LayerStore, LowerDir } from './types.js';

export { MAX_LAYER_DEPTH } from './records.js';
/** Overlay options of every mount whose lower chain contains a Gear index layer. */
export const GEAR_OVERLAY_OPTIONS: readonly string[] = ['metacopy=on', 'redirect_dir=on', 'index=off'];
/** Its data-only lowers, relative to the store root, in lookup order. */
export const GEAR_DATA_LOWERS: readonly string[] = ['pool', 'miss'];

export interface LayerStoreOptions {
  root: string;
  logger?: Logger;
  /**
   * Lazy Gear layers: open the pool, the fetcher and the miss filesystem at
   * ROOT/miss (close() releases them). Off by default (index layers are still
   * recognised and mounted; their files then come only from ROOT/pool).
   */
  lazy?: boolean | LazyOptions;
  /**
   * How index layers applied from a tar keep their index: 'image' (one EROFS
   * image file, mounted), 'dir' (a directory tree), 'auto' (default: 'image'
   * when this kernel mounts EROFS image files, else 'dir').
   */
  indexForm?: 'auto' | 'image' | 'dir';
  /** Serve Prometheus metrics at http://HOST:PORT/metrics while the store is open (metrics/registry.ts). */
  metricsAddress?: string;
  /** Refuse containers on images without a Gear index layer (--require-lazy); they are always counted and warned about. */
  requireLazy?: boolean;
}

/** How a layer is presented: its own dir as is, or an overlay mount. */
export type MountSpec =
  | { type: 'dir'; path: string }
  | { type: 'overlay'; target: string; options: OverlayOptions; readOnly: boolean };

class OverlayLayerStore implements LayerStore {
  readonly root: string;
  private readonly log: Logger | undefined;
  private readonly layersDir: string;
  private readonly linksDir: string;
  private readonly records = new Map<string, LayerRecord>();
  /** get() references per mounted layer. */
  private readonly refs = new Map<string, number>();
  private readonly locks = new KeyedMutex();
  /** ApplyDiff uploads and Diff streams in progress, per layer: remove() cancels them. */
  private readonly activity = new LayerActivity();
  private readonly lazyOpts: LazyOptions | undefined;
  private lazy: LazyRuntime | undefined;
  /** Background completion of the Gear files that containers mounted before this run may open. */
  private resume: ResumeQueue | undefined;
  private readonly indexFormOpt: 'auto' | 'image' | 'dir';
  /** Prefetch and background fetch of index layers (lazy stores only). */
  private fetches: LayerFetches | undefined;
  /** Index images being written after their ApplyDiff returned (pending-images.ts). */
  private readonly pendingImages: PendingImages;
  /** The warm-up of the index code while it runs (warm-up.ts). */
  private warmUp: AbortController | undefined;
  /** Whether new index layers get an EROFS image; why not, when they do not. */
  private indexImages = false;
  private indexImagesWhyNot = '';
  /** Index layers whose image is mounted at index/ (cleared by cleanup(), remove() and failed applies). */
  private readonly indexMounted = new Set<string>();
  private readonly metricsAddress: string | undefined;
  private metrics: MetricsServer | undefined;
  /** Non-Gear containers, gear stats and the control endpoint (store-stats.ts). */
  readonly stats: StoreStats;

  constructor(opts: LayerStoreOptions) {
    this.root = path.resolve(opts.root);
    this.log = opts.logger;
    this.metricsAddress = opts.metricsAddress;
    this.lazyOpts = opts.lazy === true ? {} : opts.lazy || undefined;
    this.layersDir = path.join(this.root, 'layers');
    this.linksDir = path.join(this.root, 'l');
    this.indexFormOpt = opts.indexForm ?? indexFormFromEnv();
    this.pendingImages = new PendingImages(this.log);
    this.stats = new StoreStats({ root: this.root, records: this.records, lazy: () => this.lazy, prefetch: () => this.fetches?.prefetcher, logger: this.log }, opts.requireLazy ?? false);
  }

  // ---- paths ---------------------------------------------------------------

  private layerDir(id: string): string {
    return path.join(this.layersDir, id);
  }
  private diffDir(id: string): string {
    return path.join(this.layersDir, id, 'diff');
  }
  private mergedDir(id: string): string {
    return path.join(this.layersDir, id, 'merged');
  }
  private linkDiffDir(link: string): string {
    return path.join(this.linksDir, link);
  }
  private indexDir(id: string): string {
    return path.join(this.layersDir, id, 'index');
  }
  private indexImage(id: string): string {
    return path.join(this.layersDir, id, INDEX_IMAGE);
  }

  private record(id: string): LayerRecord {
    validateLayerId(id);
    const r = this.records.get(id);
    if (!r) throw notFound(`layer ${id}: no such layer`);
    return r;
  }

  // ---- startup and repair ------------------------------------------------------

  async open(): Promise<void> {
    await fs.mkdir(this.layersDir, { recursive: true, mode: 0o700 });
    await fs.mkdir(this.linksDir, { recursive: true, mode: 0o700 });
    // The data-only layers of lazy mounts must exist even when lazy pull is off.
    await fs.mkdir(path.join(this.root, 'pool'), { recursive: true, mode: 0o755 });
    await ensureMissDir(this.root, this.log);

    // Leftovers of interrupted creates and removes.
    for (const name of await fs.readdir(this.layersDir)) {
      if (name.startsWith('.tmp-') || name.startsWith('.trash-') || name.startsWith('.erofs-probe-')) {
        await this.discardDir(path.join(this.layersDir, name), `leftover ${name}`);
      }
    }

    for (const id of await fs.readdir(this.layersDir)) {
      if (id.startsWith('.')) continue;
      const dir = this.layerDir(id);
      let rec: LayerRecord;
      try {
        if (!isValidLayerId(id)) throw new Error('invalid layer id');
        rec = parseRecord(await fs.readFile(path.join(dir, 'layer.json'), 'utf8'), id);
      } catch (err) {
        await this.discardDir(dir, `layer ${id} has no valid record (${(err as Error).message})`);
        continue;
      }
      if (await pathExists(path.join(dir, 'applying'))) {
        await this.discardDir(dir, `layer ${id}: its applyDiff never completed`);
        continue;
      }
      this.records.set(id, rec);
    }

    await repairLinks(this.linksDir, this.records, this.log);
    for (const r of this.records.values()) {
      if (r.parent && !this.records.has(r.parent)) {
        this.log?.warn({ layer: r.id, parent: r.parent }, 'layer parent is missing; mounting it will fail');
      }
    }

    // Mounts left by a previous run: keep those of known layers (running
    // containers may use them; the first get/put adopts them), drop the rest.
    // Only mounts strictly below layers/ are ours: the root itself, pool/ or
    // miss/ may be mount points the admin (or the managed plugin's
    // PropagatedMount, or the miss filesystem) put there.
    const adopted: string[] = [];
    for (const m of mountsUnder(this.layersDir)) {
      if (m.mountPoint === this.layersDir) continue;
      const rel = path.relative(this.layersDir, m.mountPoint).split(path.sep);
      const known = rel.length === 2 && rel[1] === 'merged' && this.records.has(rel[0]!);
      const indexMount = rel.length === 2 && rel[1] === 'index' && this.records.get(rel[0]!)?.gear?.form === 'image';
      if (known) adopted.push(rel[0]!);
      else if (!indexMount) {
        unmount(m.mountPoint, { lazy: true });
        this.log?.info({ mountPoint: m.mountPoint }, 'unmounted stale mount');
      }
    }
    if (this.indexFormOpt !== 'dir') {
      const whyNot = probeIndexImages(this.layersDir);
      this.indexImages = whyNot === undefined;
      this.indexImagesWhyNot = whyNot ?? '';
      if (whyNot !== undefined && this.indexFormOpt === 'image') {
        throw failedPrecondition(`gear: this kernel cannot mount EROFS image files (${whyNot}); needs Linux 6.12+ with CONFIG_EROFS_FS_BACKED_BY_FILE, or use the directory form (index form 'dir')`);
      }
      if (whyNot !== undefined) this.log?.info({ reason: whyNot }, 'index layers use the directory form: this kernel cannot mount EROFS image files');
    } else this.indexImagesWhyNot = 'the directory form was asked for';
    const images = [...this.records.values()].filter((r) => r.gear?.form === 'image');
    await rebuildMissingImages(images.map((r) => ({ id: r.id, image: this.indexImage(r.id), tarFile: path.join(this.layerDir(r.id), INDEX_TAR) })), this.log);
    this.mountIndexImages([...this.records.values()]);
    // Loaded only when asked for: prom-client alone is ~45 ms of a restarted daemon's start.
    const metrics = this.metricsAddress
      ? (await import('../metrics/registry.js')).createGearMetrics({
          lazy: () => this.lazy?.stats(),
          layers: () => ({ layers: this.records.size, indexLayers: [...this.records.values()].filter((r) => r.gear).length }),
          prefetch: () => this.fetches?.prefetcher.progress(),
          resume: () => this.resume?.progress(),
          backgroundFetch: () => this.fetches?.completion?.progress(),
          nonLazy: () => this.stats.nonLazy.state(),
        })
      : undefined;
    if (this.lazyOpts) {
      const lazyOpts = { ...this.lazyOpts, ...(metrics ? { onFetchDone: metrics.fetchObserver } : {}) };
      this.lazy = await attachLazyRuntime(this.root, lazyOpts, this.records.values(), this.log);
      this.startResume(this.lazy, adopted);
      this.fetches = new LayerFetches(this.lazy, this.log);
      this.fetches.present([...this.records.values()].flatMap((r) => (r.gear ? [{ id: r.id, blobs: r.gear.blobs }] : [])));
    }
    if (metrics) this.metrics = await (await import('../metrics/server.js')).serveMetrics(this.metricsAddress!, metrics.registry, this.log);
    await this.stats.serve();
    this.log?.info({ root: this.root, layers: this.records.size, lazy: !!this.lazy }, 'layer store open');
    this.warmUp = startIndexWarmUp(this.log);
  }

  /**
   * Mounts the index images of these records that are not mounted (after a
   * restart, a cleanup(), or in a new mount namespace). Throws when one
   * cannot be mounted: mounts above it would see an empty index.
   */
  private mountIndexImages(recs: Iterable<LayerRecord>): void {
    let mounts: ReturnType<typeof readMounts> | undefined;
    for (const r of recs) {
      // Known mounted (by this run, or checked at open): no mount table read on every Mounts/Get.
      if (r.gear?.form !== 'image' || this.indexMounted.has(r.id)) continue;
      mounts ??= readMounts();
      const dir = this.indexDir(r.id);
      if (!isMountPoint(dir, mounts)) {
        try {
          mountIndexImage(this.indexImage(r.id), dir);
        } catch (err) {
          throw new GearError('Internal', `layer ${r.id}: cannot mount its index image ${this.indexImage(r.id)} at ${dir}: ${(err as Error).message}`, { cause: err });
        }
        this.log?.debug({ layer: r.id }, 'mounted index image');
      }
      this.indexMounted.add(r.id);
    }
  }

  /** The records of id and its parents. */
  private chain(id: string): LayerRecord[] {
    const out: LayerRecord[] = [];
    let cur: string | undefined = id;
    for (let depth = 0; cur && depth <= MAX_LAYER_DEPTH; depth++) {
      const r = this.records.get(cur);
      if (!r) break;
      out.push(r);
      cur = r.parent;
    }
    return out;
  }

  async close(): Promise<void> {
    this.warmUp?.abort();
    await this.pendingImages.settleAll();
    const lazy = this.lazy;
    this.lazy = undefined;
    await this.metrics?.close();
    this.metrics = undefined;
    await this.stats.close();
    await this.fetches?.close();
    await this.resume?.close();
    await lazy?.close();
  }

  /**
   * Mounts adopted from a previous run still use that run's miss filesystem
   * (dead after a crash, detached after a clean stop): complete the files of
   * their index layers into the pool, where overlay finds them (resume.ts).
   */
  private startResume(lazy: LazyRuntime, mounted: string[]): void {
    const indexLayers = indexLayersInUse(this.root, this.records, mounted);
    if (indexLayers.size === 0) return;
    const files: ResumeFile[] = [];
    for (const id of indexLayers) for (const [digest, size] of this.records.get(id)!.gear!.blobs) files.push({ digest, size });
    this.resume = new ResumeQueue({ pool: lazy.pool, fetcher: lazy.fetcher, catalog: lazy.catalog, ...(this.log ? { logger: this.log } : {}) });
    this.resume.start(files, indexLayers.size).catch((err: unknown) => this.log?.warn({ err: describeError(err) }, 'resume of mounted Gear files failed'));
  }

  /** The crash resume of this run, if mounted containers used index layers at open (tests, status). */
  get resumeQueue(): ResumeQueue | undefined {
    return this.resume;
  }

  /** The prefetch of listed files (lazy stores only). */
  get prefetch(): Prefetcher | undefined {
    return this.fetches?.prefetcher;
  }

  /** Where the Prometheus metrics are served (HOST:PORT), when they are. */
  get metricsEndpoint(): string | undefined {
    return this.metrics?.address;
  }

  /** The lazy machinery, when the store was opened with `lazy` (tests, status). */
  get lazyRuntime(): LazyRuntime | undefined {
    return this.lazy;
  }

  private async discardDir(dir: string, why: string): Promise<void> {
    unmountUnder(dir);
    await fs.rm(dir, { recursive: true, force: true });
    this.log?.warn({ dir }, `removed ${why}`);
  }

  // ---- lifecycle -----------------------------------------------------------------

  async create(id: string, parent: string, kind: LayerKind, opts: CreateOptions = {}): Promise<void> {
    validateLayerId(id);
    if (parent) validateLayerId(parent, 'parent id');
    for (const key of Object.keys(opts.storageOpt ?? {})) {
      throw invalidArgument(`storage option ${JSON.stringify(key)} is not supported by gear`);
    }
    await this.locks.run(id, async () => {
      if (this.records.has(id)) throw alreadyExists(`layer ${id} already exists`);
      let lowers: string[] = [];
      if (parent) {
        const p = this.records.get(parent);
        if (!p) throw notFound(`parent layer ${parent} of ${id}: no such layer`);
        lowers = [p.link, ...p.lowers];
        if (lowers.length + 1 > MAX_LAYER_DEPTH) {
          throw failedPrecondition(`layer ${id}: more than ${MAX_LAYER_DEPTH} layers in one image (max depth exceeded)`);
        }
      }
      const rec: LayerRecord = { id, parent, kind, link: newLink(), lowers, created: Date.now() };
      const tmp = path.join(this.layersDir, `.tmp-${id}-${randomBytes(4).toString('hex')}`);
      try {
        await fs.mkdir(tmp, { mode: 0o700 });
        await fs.mkdir(path.join(tmp, 'diff'), { mode: 0o755 });
        await fs.mkdir(path.join(tmp, 'work'), { mode: 0o700 });
        await fs.mkdir(path.join(tmp, 'merged'), { mode: 0o700 });
        await writeFileAtomic(path.join(tmp, 'layer.json'), JSON.stringify(rec));
        await fs.symlink(`../layers/${id}/diff`, path.join(this.linksDir, rec.link));
        await fs.rename(tmp, this.layerDir(id));
        await syncDir(this.layersDir);
      } catch (err) {
        await fs.rm(tmp, { recursive: true, force: true });
        await fs.rm(path.join(this.linksDir, rec.link), { force: true });
        throw err;
      }
      this.records.set(id, rec);
      this.log?.debug({ layer: id, parent, kind }, 'created layer');
    });
  }

  async remove(id: string): Promise<void> {
    validateLayerId(id);
    // Never wait behind a stalled upload (it holds the lock) nor leave a Diff reading a layer that goes away.
    this.activity.cancelAll(id, unavailable(`layer ${id} was removed while this call was still transferring it (ApplyDiff upload or Diff stream)`));
    await this.locks.run(id, async () => {
      const rec = this.records.get(id);
      if (!rec) return;
      await this.pendingImages.settle(id);
      // The merged view, and an index image's mount (overlays that use it keep their own reference).
      unmountUnder(this.layerDir(id));
      this.indexMounted.delete(id);
      this.refs.delete(id);
      const trash = path.join(this.layersDir, `.trash-${id}-${randomBytes(4).toString('hex')}`);
      await fs.rename(this.layerDir(id), trash);
      this.records.delete(id);
      await fs.rm(path.join(this.linksDir, rec.link), { force: true });
      await syncDir(this.layersDir);
      await fs.rm(trash, { recursive: true, force: true });
      this.fetches?.stop(id);
      this.lazy?.usage.forgetContainer(id);
      if (rec.gear && this.lazy) {
        this.lazy.catalog.remove(id);
        await this.lazy.pool.dropReferences(id);
      }
      this.log?.debug({ layer: id }, 'removed layer');
    });
  }

  /**
   * A container is created on `parent`: its image's cached Gear files count as used now (LRU),
   * since the reads overlay then serves from the pool never reach the daemon (pool.ts).
   */
  admitContainer(id: string, parent: string, image?: string): (() => void) | undefined {
    const index = parent ? this.stats.indexLayerOf(parent) : undefined;
    if (index) this.lazy?.pool.touchReferenced(index);
    return this.stats.admitContainer(id, parent, image);
  }

  async exists(id: string): Promise<boolean> {
    try {
      validateLayerId(id);
    } catch {
      return false;
    }
    return this.records.has(id);
  }

  // ---- mounts ----------------------------------------------------------------------

  /** How the merged view of a layer is made (without making it). */
  mountSpec(id: string): MountSpec {
    const rec = this.record(id);
    if (rec.lowers.length === 0) return { type: 'dir', path: this.diffDir(id) };
    // Below an index layer: its metacopy files take their data from the pool, else the miss filesystem.
    const base: Pick<OverlayOptions, 'extra' | 'dataLowers'> = this.onIndexLayer(rec, rec.kind === 'ro')
      ? { extra: [...GEAR_OVERLAY_OPTIONS], dataLowers: [...GEAR_DATA_LOWERS] }
      : { extra: ['index=off'] };
    if (rec.kind === 'ro') {
      // An index layer itself shows its index form (diff/), not index/ (tar-split, A.9).
      const top = rec.gear ? `layers/${id}/diff` : `l/${rec.link}`;
      return {
        type: 'overlay',
        target: this.mergedDir(id),
        readOnly: true,
        options: { ...base, lowers: [top, ...rec.lowers.map((l) => `l/${l}`)] },
      };
    }
    return {
      type: 'overlay',
      target: this.mergedDir(id),
      readOnly: false,
      options: {
        ...base,
        lowers: rec.lowers.map((l) => `l/${l}`),
        upper: `layers/${id}/diff`,
        work: `layers/${id}/work`,
      },
    };
  }

  /** True when a layer below rec (or rec itself, unless `parentsOnly`) is a Gear index layer. */
  private onIndexLayer(rec: LayerRecord, parentsOnly: boolean): boolean {
    if (!parentsOnly && rec.gear) return true;
    let cur = rec.parent;
    for (let depth = 0; cur && depth <= MAX_LAYER_DEPTH; depth++) {
      const p = this.records.get(cur);
      if (!p) return false;
      if (p.gear) return true;
      cur = p.parent;
    }
    return false;
  }

  async get(id: string): Promise<string> {
    return this.locks.run(id, async () => this.acquire(id));
  }

  private async acquire(id: string): Promise<string> {
    await this.pendingImages.ready(this.chain(id).map((r) => r.id));
    if (this.record(id).gear) await this.ensureIndexForm(id);
    const spec = this.mountSpec(id);
    if (spec.type === 'dir') return spec.path;
    const mounted = isMountPoint(spec.target);
    if (!mounted) this.mountIndexImages(this.chain(id));
    // A mount made before a restart is adopted as one reference (as overlay2 does).
    let count = this.refs.get(id) ?? (mounted ? 1 : 0);
    if (!mounted) {
      for (const p of this.missingLowers(id)) {
        throw failedPrecondition(`layer ${id}: lower layer ${p} is missing; the store is damaged`);
      }
      try {
        if (spec.options.dataLowers?.length) await this.mountOffThread(spec.target, spec.options, spec.readOnly);
        else mountOverlay(spec.target, spec.options, this.root, spec.readOnly ? constants.MS_RDONLY : 0);
      } catch (err) {
        throw new GearError('Internal', `layer ${id}: cannot mount overlay at ${spec.target}: ${(err as Error).message}`, {
          cause: err,
        });
      }
      count = 0;
    }
    this.refs.set(id, count + 1);
    return spec.target;
  }

  /**
   * mount(2) on a worker thread with cwd ROOT (relative lowerdirs): overlay
   * queries the miss filesystem (statfs, lookups) while mounting, and this
   * process's JS thread serves it. (A mount(8) child did the same at ~10 ms
   * per container start.)
   */
  private async mountOffThread(target: string, o: OverlayOptions, readOnly: boolean): Promise<void> {
    const data = overlayData(o);
    if (Buffer.byteLength(data) > MAX_MOUNT_DATA) {
      throw new Error(`overlay mount options for ${target} are ${Buffer.byteLength(data)} bytes, over the ${MAX_MOUNT_DATA}-byte limit`);
    }
    await bounded(native.mountAsync('overlay', target, 'overlay', readOnly ? constants.MS_RDONLY : 0, data, this.root), 60_000, `mount of ${target}`);
  }

  private async unmountOffThread(target: string): Promise<void> {
    try {
      await bounded(native.umount2Async(target, 0), 30_000, `unmount of ${target}`);
    } catch (err) {
      const code = errnoCode(err);
      if (code === 'EINVAL' || code === 'ENOENT') return; // not mounted
      this.log?.warn({ target, err: (err as Error).message }, 'umount failed; detaching lazily');
      unmount(target, { lazy: true });
    }
  }

  private missingLowers(id: string): string[] {
    const rec = this.record(id);
    const missing: string[] = [];
    let cur = rec.parent;
    for (let depth = 0; cur && depth <= MAX_LAYER_DEPTH; depth++) {
      const p = this.records.get(cur);
      if (!p) {
        missing.push(cur);
        break;
      }
      cur = p.parent;
    }
    return missing;
  }

  async put(id: string): Promise<void> {
    await this.locks.run(id, async () => this.release(id));
  }

  private async release(id: string): Promise<void> {
    const spec = this.mountSpec(id);
    if (spec.type === 'dir') return;
    const mounted = isMountPoint(spec.target);
    const count = (this.refs.get(id) ?? (mounted ? 1 : 0)) - 1;
    if (count > 0) {
      this.refs.set(id, count);
      return;
    }
    this.refs.delete(id);
    if (!mounted) return;
    if (spec.options.dataLowers?.length) await this.unmountOffThread(spec.target);
    else unmount(spec.target);
  }

  async metadata(id: string): Promise<Record<string, string>> {
    const rec = this.record(id);
    const meta: Record<string, string> = {
      UpperDir: this.diffDir(id),
      WorkDir: path.join(this.layerDir(id), 'work'),
      MergedDir: this.mergedDir(id),
    };
    if (rec.lowers.length) meta.LowerDir = rec.lowers.map((l) => this.resolveLink(l)).join(':');
    return meta;
  }

  private resolveLink(link: string): string {
    for (const r of this.records.values()) if (r.link === link) return r.gear ? this.indexDir(r.id) : this.diffDir(r.id);
    return this.linkDiffDir(link);
  }

  async status(): Promise<Array<[string, string]>> {
    return [
      ['Backing Filesystem', backingFilesystem(this.root)],
      ['Supports d_type', 'true'],
      ['Native Overlay Diff', 'true'],
      ['Root', this.root],
      ['Layers', String(this.records.size)],
      ['Mounted', String(this.refs.size)],
      ['Index Layers', String([...this.records.values()].filter((r) => r.gear).length)],
      ['Index Form', this.indexImages ? 'EROFS image per index layer (file-backed mount)' : `directory tree (${this.indexImagesWhyNot})`],
      ...(this.lazy ? this.lazy.status() : [['Lazy Pull', 'off'] as [string, string]]),
      ...(this.fetches ? this.fetches.status() : []),
      ...(this.lazy ? [['Resume', this.resume ? this.resume.status() : 'none (no mounted container used a Gear index layer at start)'] as [string, string]] : []),
      ['Metrics', this.metrics ? `http://${this.metrics.address}/metrics` : 'off (--metrics-address)'],
      ...this.stats.status(),
    ];
  }

  async cleanup(): Promise<void> {
    await this.pendingImages.settleAll();
    for (const m of mountsUnder(this.layersDir)) if (m.mountPoint !== this.layersDir) unmount(m.mountPoint, { lazy: true });
    this.indexMounted.clear();
    this.refs.clear();
    this.log?.info('unmounted all layers');
  }

  // ---- content ----------------------------------------------------------------------

  async applyDiff(id: string, parent: string, tar: Readable, opts: ApplyOptions = {}): Promise<number> {
    // A refused call changes nothing; its tar is drained (the reply to an HTTP body goes out once it is read).
    const refuse = (err: Error): never => {
      tar.on('error', () => {});
      tar.resume();
      throw err;
    };
    try {
      this.record(id);
    } catch (err) {
      refuse(err as Error);
    }
    // remove() cancels the upload, even while it waits for the lock.
    const done = this.activity.begin(id, (reason) => {
      tar.on('error', () => {}); // whoever reads the tar sees the reason; unread, it must not be an uncaught 'error'
      tar.destroy(reason);
    });
    try {
      return await this.locks.run(id, async () => {
        let rec: LayerRecord;
        try {
          rec = this.record(id);
        } catch (err) {
          return refuse(err as Error);
        }
        if (parent !== rec.parent) {
          refuse(invalidArgument(`layer ${id}: applyDiff with parent ${JSON.stringify(parent)}, but its parent is ${JSON.stringify(rec.parent)}`));
        }
        if (this.refs.has(id) || isMountPoint(this.mergedDir(id))) refuse(failedPrecondition(`layer ${id} is mounted; cannot apply a diff to it`));
        const held = await this.contentOf(id, rec);
        if (held) refuse(failedPrecondition(`layer ${id} already has content (${held}); a layer's diff is applied once (remove and re-create it to apply another)`));
        return await this.applyLocked(id, rec, tar, opts);
      });
    } finally {
      done();
    }
  }

  /** What a layer already holds that an ApplyDiff would replace, or '' for an empty, never-applied layer. */
  private async contentOf(id: string, rec: LayerRecord): Promise<string> {
    if (rec.gear) return 'it is a Gear index layer';
    if (rec.size !== undefined) return 'a diff was applied to it';
    if (await pathExists(path.join(this.layerDir(id), INDEX_TAR))) return `its ${INDEX_TAR}`;
    if (await pathExists(this.indexImage(id))) return 'its index image';
    if ((await fs.readdir(this.indexDir(id)).catch(() => [])).length > 0) return 'its index dir';
    const names = await fs.readdir(this.diffDir(id));
    return names.length > 0 ? `${names.length} entries in its diff dir` : '';
  }

  /** applyDiff once the layer is known to be empty, unmounted and locked. */
  private async applyLocked(id: string, rec: LayerRecord, tar: Readable, opts: ApplyOptions): Promise<number> {
    this.warmUp?.abort();
    const marker = path.join(this.layerDir(id), 'applying');
    await writeFileAtomic(marker, '');
    const diff = this.diffDir(id);
    const index = this.indexDir(id);
    let size: number;
    let gear: GearLayerInfo | undefined;
    const tarFile = path.join(this.layerDir(id), INDEX_TAR);
    const image = this.indexImage(id);
    let writeImage: (() => Promise<void>) | undefined;
    const phases = new Phases();
    try {
      // Drained, not destroyed, on error: the tar usually is an HTTP request body
      // whose reply (carrying the error) can only go out once it is read.
      const { head, input } = await peekHead(tar, 64 * 1024);
      phases.mark('head');
      if (headIsIndexLayer(head)) {
        // An index layer: index/ straight from the tar; diff/ (the index form) only when asked for.
        unmountUnder(index);
        this.indexMounted.delete(id);
        await fs.rm(index, { recursive: true, force: true });
        await fs.rm(tarFile, { force: true });
        await fs.rm(image, { force: true });
        try {
          const applied = await applyIndexLayer(layerBytes(input), this.indexImages ? { image, deferImage: opts.deferIndexImage === true } : { dir: index }, tarFile, () => phases.mark('manifest'));
          size = applied.size;
          gear = this.gearInfo(id, applied.manifest, applied);
          phases.mark('built');
          const mount = (): void => {
            mountIndexImage(image, index);
            this.indexMounted.add(id);
          };
          const write = applied.writeImage;
          if (this.indexImages) gear.form = 'image';
          if (write) {
            writeImage = async () => {
              await write();
              mount();
            };
          } else if (this.indexImages) mount();
        } catch (err) {
          input.on('error', () => {});
          input.resume();
          throw err;
        }
      } else {
        ({ size } = await applyLayer(input, diff, { drainInputOnError: true }));
      }
    } catch (err) {
      await emptyDir(diff).catch(() => undefined);
      unmountUnder(index);
      this.indexMounted.delete(id);
      await fs.rm(index, { recursive: true, force: true }).catch(() => undefined);
      await fs.rm(tarFile, { force: true }).catch(() => undefined);
      await fs.rm(image, { force: true }).catch(() => undefined);
      await fs.rm(marker, { force: true });
      throw err instanceof GearError ? err : new GearError('Internal', `layer ${id}: ${(err as Error).message}`, { cause: err });
    }
    const updated: LayerRecord = { ...rec, size };
    if (gear) {
      updated.gear = gear;
      await pointLink(this.linksDir, updated); // layers above see index/
      this.registerGearFiles(id, gear);
      phases.mark('referenced');
    }
    await writeFileAtomic(path.join(this.layerDir(id), 'layer.json'), JSON.stringify(updated));
    phases.mark('recorded');
    await fs.rm(marker, { force: true });
    await syncDir(this.layerDir(id));
    await syncDir(this.linksDir);
    this.records.set(id, updated);
    if (writeImage) this.pendingImages.start(id, writeImage);
    // Once the layer is recorded, and planned after ApplyDiff answers (Prefetcher.begin). It used to start as
    // soon as the manifest was read: its planning, responses and commits then shared the main thread with
    // the index build, which took 190-310 ms instead of 60-80 (python3), and the pull 0.46-0.65 s instead of
    // 0.32-0.34 on 2 cores; started here, the pull is 0.40 s and the deploy shorter too (1.52 s against
    // 1.75, medians of 3; bench profile 2026-12-07, docs/lazy.md).
    this.fetches?.recorded(id, gear?.blobs);
    phases.mark('synced');
    this.log?.debug({ layer: id, size, gearFiles: gear?.files, ms: phases.durations }, gear ? 'applied gear index layer' : 'applied layer');
    return size;
  }

  /**
   * The Gear files of a new index layer: known to the catalog, and referenced
   * in the pool at once (in memory); the references file is written in the
   * background (~60 ms for 6,000 files, fsync included, which was on a
   * containerd Commit's path): the layer record is the truth, open() rewrites
   * the references of a record that has none, and a later dropReferences of
   * this layer is written after it (one queue per owner).
   */
  private registerGearFiles(id: string, gear: GearLayerInfo): void {
    if (!this.lazy) return;
    this.lazy.catalog.add(id, gear.location, gear.blobs, gear.packs);
    this.lazy.pool.setReferenced(id, gear.blobs.map((b) => b[0])).catch((err: unknown) => {
      this.log?.warn({ layer: id, err: describeError(err) }, 'could not record the pool references of an index layer; the next start does');
    });
  }

  /**
   * diff/ holds an index layer's index form (extracted by someone else, e.g. a
   * snapshotter's Commit): validate its manifest and build index/.
   */
  async buildIndex(id: string, diff: string, index: string): Promise<GearLayerInfo> {
    const manifest = await readIndexManifest(diff);
    await fs.rm(index, { recursive: true, force: true });
    const r = manifest.tree ? buildIndexDirFromEntries(index, manifest, manifest.tree) : await buildIndexDir(diff, index, manifest);
    return this.gearInfo(id, manifest, r);
  }

  private gearInfo(id: string, manifest: IndexManifest, r: IndexDirResult): GearLayerInfo {
    if (this.lazy) checkKnownSizes(manifest, { pool: (d) => this.lazy!.pool.sizeOf(d), listed: (d) => this.lazy!.catalog.sizeOf(d) });
    const info: GearLayerInfo = { files: r.files, bytes: r.bytes, blobs: r.blobs, ...(r.packs ? { packs: r.packs } : {}) };
    this.fetches?.plan(id, prefetchFilesOf(manifest));
    if (manifest.location) info.location = manifest.location;
    else this.log?.warn({ layer: id }, 'gear index layer names no registry: its files can only come from the pool');
    this.log?.info({ layer: id, files: r.files, distinct: r.blobs.length, bytes: r.bytes, location: manifest.location }, 'gear index layer');
    return info;
  }

  /**
   * The index form of an index layer applied from its tar (layers/<id>/index.tar)
   * is extracted into diff/ on the first view of the layer itself (Get() for
   * push, save, diff); a pull never needs it. Extracted beside diff/ and
   * renamed over the empty diff/, so a crash leaves either form whole.
   */
  private async ensureIndexForm(id: string): Promise<void> {
    const dir = this.layerDir(id);
    const tarFile = path.join(dir, INDEX_TAR);
    if (!(await pathExists(tarFile))) return;
    const diff = this.diffDir(id);
    if (!(await pathExists(path.join(diff, RESERVED_DIR)))) {
      const tmp = path.join(dir, 'diff.tmp');
      await fs.rm(tmp, { recursive: true, force: true });
      await fs.mkdir(tmp, { mode: 0o755 });
      await applyLayer(createReadStream(tarFile), tmp);
      await fs.rename(tmp, diff);
      await syncDir(dir);
    }
    await fs.rm(tarFile, { force: true });
  }

  /**
   * Runs fn with the merged view of the layer and of `parent` (an empty dir
   * for none) held mounted: the whole-tree comparison of moby's naive diff.
   */
  private async withTreeViews<T>(id: string, parent: string, fn: (merged: string, parentMerged: string) => Promise<T>): Promise<T> {
    this.record(id);
    if (parent) this.record(parent);
    const merged = await this.get(id);
    try {
      if (!parent) return await fn(merged, await this.emptyDirPath());
      const parentMerged = await this.get(parent);
      try {
        return await fn(merged, parentMerged);
      } finally {
        await this.put(parent);
      }
    } finally {
      await this.put(id);
    }
  }

  /**
   * Runs fn with the layer's own dir, its lowers and its merged view held
   * mounted (the merged view supplies data of metacopy files and the subtrees
   * of redirected directories).
   */
  private async withUpperView<T>(id: string, fn: (v: OverlayLayerPaths) => Promise<T>): Promise<T> {
    const rec = this.record(id);
    const merged = await this.get(id);
    try {
      return await fn({ upper: this.diffDir(id), lowers: rec.lowers.map((l) => this.resolveLink(l)), merged });
    } finally {
      await this.put(id);
    }
  }

  /**
   * docker diff. overlay2 always answers Changes with moby's naive diff (a
   * comparison of the two merged trees: directory mtimes and non-capability
   * xattrs ignored, a replaced lower symlink "modified", a recreated lower
   * directory "modified" with its lost children deleted), so this does too.
   */
  async changes(id: string, parent: string): Promise<Change[]> {
    return this.withTreeViews(id, parent, (merged, parentMerged) => treeChanges(merged, parentMerged));
  }

  /**
   * overlay2 answers Diff and DiffSize from the upper dir when `parent` is the
   * layer's real parent (moby's isParent), and with the naive diff otherwise.
   */
  async diffSize(id: string, parent: string): Promise<number> {
    if (parent === this.record(id).parent) return this.withUpperView(id, (v) => overlayDiffSize(v));
    return this.withTreeViews(id, parent, async (merged, parentMerged) => changesSize(merged, await treeChanges(merged, parentMerged)));
  }

  async diff(id: string, parent: string): Promise<Readable> {
    const native = parent === this.record(id).parent;
    // The views stay mounted until the tar stream has been read or dropped.
    const out = new PassThrough();
    // A failure before the caller has the stream (e.g. remove() won the race for the lock) rejects
    // `started`; destroying `out` then must not be an 'error' event nobody listens to (an uncaught
    // exception). The caller's own listeners see every error after that.
    out.on('error', () => {});
    const untrack = this.activity.begin(id, (reason) => out.destroy(reason));
    let ready!: (s: Readable) => void;
    let failed!: (e: unknown) => void;
    const started = new Promise<Readable>((resolve, reject) => {
      ready = resolve;
      failed = reject;
    });
    const pump = (tar: Readable) => {
      ready(out);
      return new Promise<void>((resolve) => {
        tar.once('error', (err) => {
          out.destroy(err);
          resolve();
        });
        out.once('close', () => {
          tar.destroy();
          resolve();
        });
        tar.pipe(out);
      });
    };
    const done = native
      ? this.withUpperView(id, (v) => pump(overlayDiff(v)))
      : this.withTreeViews(id, parent, async (merged, parentMerged) => pump(exportChanges(merged, await treeChanges(merged, parentMerged))));
    done
      .catch((err: unknown) => {
        failed(err);
        out.destroy(err as Error);
      })
      .finally(untrack);
    return started;
  }

  // ---- index forms extracted by another unpacker (containerd snapshotter) ----------

  /**
   * See IndexLayerAdoption.adoptIndexForm. Idempotent (an adopted layer
   * returns its info). Crash safety: index/ is built under a temp name and
   * renamed into place, and the record (with `gear`) is written last; a crash
   * leaves either the plain layer, possibly with an unrecorded index/ or temp
   * dir inside its own dir (ignored, replaced by the next adopt, removed with
   * the layer), or the complete index layer (open() repairs its short link).
   */
  async adoptIndexForm(id: string): Promise<GearLayerInfo | undefined> {
    const rec0 = this.record(id);
    if (rec0.gear) return rec0.gear;
    return this.locks.run(id, async () => {
      const rec = this.record(id);
      if (rec.gear) return rec.gear;
      const diff = this.diffDir(id);
      if (!(await hasIndexFormSignature(diff))) return undefined;
      this.warmUp?.abort();
      if (rec.parent) {
        throw invalidArgument(
          `layer ${id}: holds a Gear index (.gear/index.json) but has a parent layer; a Gear index must be an image's only layer (convert the whole image with gear convert)`,
        );
      }
      if (this.refs.has(id) || isMountPoint(this.mergedDir(id))) throw failedPrecondition(`layer ${id} is mounted; unmount it before committing`);
      const dir = this.layerDir(id);
      unmountUnder(this.indexDir(id)); // an unrecorded earlier attempt's image mount
      this.indexMounted.delete(id);
      for (const name of await fs.readdir(dir)) {
        if (name === 'index' || name.startsWith('.index-')) await fs.rm(path.join(dir, name), { recursive: true, force: true });
      }
      const tmp = path.join(dir, `.index-${randomBytes(4).toString('hex')}`);
      const image = this.indexImage(id);
      await fs.rm(image, { force: true });
      let gear: GearLayerInfo;
      const phases = new Phases();
      try {
        if (this.indexImages) {
          // One image file instead of a second inode per entry (containerd's unpacker made the first).
          const manifest = await readIndexManifest(diff);
          phases.mark('manifest');
          const { root, result } = manifest.tree ? indexTreeFromEntries(manifest, manifest.tree) : indexTreeFromDir(diff, manifest);
          phases.mark('built');
          writeIndexImage(image, root);
          phases.mark('image');
          gear = { ...this.gearInfo(id, manifest, result), form: 'image' };
          mountIndexImage(image, this.indexDir(id));
          this.indexMounted.add(id);
        } else {
          gear = await this.buildIndex(id, diff, tmp);
          await fs.rename(tmp, this.indexDir(id));
        }
      } catch (err) {
        unmountUnder(this.indexDir(id));
        this.indexMounted.delete(id);
        await fs.rm(image, { force: true }).catch(() => undefined);
        await fs.rm(tmp, { recursive: true, force: true }).catch(() => undefined);
        if (err instanceof GearError) {
          throw new GearError(err.class, `layer ${id}: not a valid Gear index layer: ${err.message} (re-convert the image with gear convert)`, { cause: err });
        }
        throw new GearError('Internal', `layer ${id}: cannot build the Gear index dir: ${(err as Error).message}`, { cause: err });
      }
      const updated: LayerRecord = { ...rec, gear };
      try {
        this.registerGearFiles(id, gear);
        phases.mark('referenced');
        await writeFileAtomic(path.join(dir, 'layer.json'), JSON.stringify(updated));
        await syncDir(dir);
        phases.mark('recorded');
      } catch (err) {
        if (this.lazy) {
          this.lazy.catalog.remove(id);
          await this.lazy.pool.dropReferences(id).catch(() => undefined);
        }
        unmountUnder(this.indexDir(id));
        this.indexMounted.delete(id);
        await fs.rm(image, { force: true }).catch(() => undefined);
        await fs.rm(this.indexDir(id), { recursive: true, force: true }).catch(() => undefined);
        throw new GearError('Internal', `layer ${id}: cannot record the Gear index layer: ${(err as Error).message}`, { cause: err });
      }
      this.records.set(id, updated);
      this.fetches?.recorded(id, gear.blobs);
      await pointLink(this.linksDir, updated); // layers above see index/ (open() repairs it after a crash)
      await syncDir(this.linksDir);
      phases.mark('synced');
      this.log?.debug({ layer: id, gearFiles: gear.files, ms: phases.durations }, 'adopted gear index layer');
      return gear;
    });
  }

  lowerOf(id: string): LowerDir {
    const rec = this.record(id);
    this.mountIndexImages([rec]);
    return { dir: rec.gear ? this.indexDir(id) : this.diffDir(id), short: this.linkDiffDir(rec.link), gear: !!rec.gear };
  }

  get dataLowers(): string[] {
    return GEAR_DATA_LOWERS.map((d) => path.join(this.root, d));
  }

  private async emptyDirPath(): Promise<string> {
    const dir = path.join(this.root, 'empty');
    await fs.mkdir(dir, { recursive: true, mode: 0o755 });
    return dir;
  }
}

/** Opens (creating if needed) the layer store at opts.root and repairs what a crash left. */
export async function openLayerStore(
  opts: LayerStoreOptions,
): Promise<
  LayerStore &
    IndexLayerAdoption & {
      mountSpec(id: string): MountSpec;
      readonly lazyRuntime: LazyRuntime | undefined;
      readonly prefetch: Prefetcher | undefined;
      readonly metricsEndpoint: string | undefined;
      readonly stats: StoreStats;
    }
> {
  const store = new OverlayLayerStore(opts);
  try {
    await store.open();
  } catch (err) {
    if (errnoCode(err) === 'EACCES' || errnoCode(err) === 'EPERM') {
      throw new GearError('PermissionDenied', `cannot open the layer store at ${opts.root}: ${(err as Error).message} (gear must run as root)`, {
        cause: err,
      });
    }
    throw err;
  }
  return store;
}
