/**
 * containerd's snapshot model on top of the core's layer store.
 *
 * Vocabulary (as in containerd's snapshots package):
 * - an *active* snapshot is created by Prepare under a *key*; it is writable;
 * - a *view* is created by View under a key; it is read-only;
 * - Commit turns an active snapshot into a *committed* one under a *name*,
 *   without moving data: the same layer simply gets a new record;
 * - a *parent* is always a committed snapshot. Keys and names share one space.
 *
 * Each snapshot owns one layer of the core store (random hex id):
 * - active: a read-write layer whose core parent is the parent's layer, so the
 *   core knows the real chain (diffs, depth limit);
 * - view: a parentless read-only layer. Its own directory is only used when it
 *   has no parent (an empty, read-only root); otherwise its mounts are made of
 *   the parents' directories alone. Keeping it out of the core chain lets a
 *   view sit on top of 128 committed layers, as containerd's suite requires.
 *
 * Mounts are returned, never performed (containerd mounts them):
 *   no parent                 bind <own diff>              rbind + rw|ro
 *   view, one parent          bind <parent diff>           rbind + ro
 *   otherwise                 overlay index=off, lowerdir=<parents, nearest first>
 *                             and, when active, upperdir/workdir
 * Paths are absolute; containerd compacts long lowerdir options itself.
 *
 * Gear images (lazy): Commit of a parentless snapshot whose content is a Gear
 * index form (.gear/index.json, as `gear convert` makes it; containerd's own
 * applier extracted it) turns its layer into a Gear index layer in the core
 * (metacopy index dir, catalog, pool references). Every mount whose parent
 * chain contains one is an overlay, a view with a single parent included:
 *   overlay metacopy=on,redirect_dir=on,index=off,
 *           lowerdir=<parents: ROOT/l/<link>, nearest first>::ROOT/pool::ROOT/miss
 *           [,workdir=…,upperdir=…]  (views: ro, no upper)
 * containerd cannot compact a lowerdir holding "::" (its common prefix is
 * then empty), so those lowers use the core's short links and a chain too
 * long for one page is refused at Prepare/View.
 */
import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import {
  alreadyExists,
  describeError,
  failedPrecondition,
  GearError,
  invalidArgument,
  notFound,
} from '../../core/errors.js';
import { GEAR_OVERLAY_OPTIONS } from '../../core/layers/store.js';
import type { IndexLayerAdoption, LayerStore } from '../../core/layers/types.js';
import { clientKey, isImageUnpack } from './containers.js';
import { parseFilters } from './filters.js';
import { MetaStore, type SnapshotKind, type SnapshotRecord, type TimestampNs } from './metastore.js';
import { diskUsage, type Usage } from './usage.js';

/** What the snapshotter needs from the core's layer store. */
export type SnapshotLayers = Pick<LayerStore, 'create' | 'remove' | 'exists' | 'metadata' | 'admitContainer'> & IndexLayerAdoption;

/**
 * containerd mounts an overlay itself and only compacts lowerdir (which "::"
 * defeats) when the options reach a page minus 512 bytes; beyond a page it fails.
 */
const MAX_GEAR_MOUNT_OPTIONS = 4096 - 512;

/** One label's key plus value may not exceed this (containerd's labels.Validate). */
export const MAX_LABEL_SIZE = 4096;

/**
 * Label of a snapshot that remote.ts made on Gear's own (containerd's
 * remote-snapshot protocol): `empty` for a layer below an attached Gear index
 * (it holds nothing; the index above it shows the whole image), `index` for
 * the top layer, served by the Gear index tree.
 */
export const GEAR_REMOTE_LABEL = 'containerd.io/snapshot/gear.remote';

/** Labels under this prefix are Gear's own (remote.ts): a client can neither set nor change them. */
export const GEAR_OWN_LABEL_PREFIX = 'containerd.io/snapshot/gear.';

/**
 * A Prepare that remote.ts may answer itself: true when it created the
 * committed snapshot named by the `containerd.io/snapshot.ref` label (Prepare
 * then answers ALREADY_EXISTS), false to prepare normally.
 */
export type RemotePrepare = (key: string, parent: string, labels: Record<string, string>) => Promise<boolean>;

/**
 * Fills remote snapshots' empty layers (bottom first) with their real
 * content, when a snapshot that is not on their Gear index needs them
 * (another image shares the layers). remote.ts downloads and applies them.
 */
export type FillEmpty = (records: ReadonlyArray<Readonly<SnapshotRecord>>) => Promise<void>;

/** Snapshot information as containerd sees it. */
export interface SnapshotInfo {
  name: string;
  parent: string;
  kind: SnapshotKind;
  labels: Record<string, string>;
  created: TimestampNs;
  updated: TimestampNs;
}

/** A mount for containerd to perform (containerd.types.Mount). */
export interface MountSpec {
  type: 'bind' | 'overlay';
  source: string;
  options: string[];
}

export interface SnapshotterOptions {
  /** The core's layer store (shared code with the graph driver). */
  layers: SnapshotLayers;
  /** Directory for the snapshot records (e.g. ROOT/snapshotter). */
  metaRoot: string;
  logger?: Logger;
}

/**
 * Wall-clock time in nanoseconds. Date.now() has only millisecond resolution,
 * which would stamp a snapshot *before* a client's nanosecond clock read taken
 * just before the request; timeOrigin + now() is microsecond-precise.
 */
export function nowNs(): TimestampNs {
  const us = BigInt(Math.floor((performance.timeOrigin + performance.now()) * 1000));
  return (us * 1000n).toString();
}

/** Drops empty values (containerd treats an empty label as absent) and enforces the size limit. */
function cleanLabels(labels: Record<string, string> | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(labels ?? {})) {
    if (Buffer.byteLength(k) + Buffer.byteLength(v) > MAX_LABEL_SIZE) {
      throw invalidArgument(`label key and value greater than maximum size (${MAX_LABEL_SIZE} bytes), key: ${k.slice(0, 64)}`);
    }
    if (v !== '') out[k] = v;
  }
  return out;
}

/** A client's labels (Prepare, View, Commit, Update): cleaned, and never Gear's own (GEAR_OWN_LABEL_PREFIX), which only remote.ts sets. */
function clientLabels(labels: Record<string, string> | undefined): Record<string, string> {
  const out = cleanLabels(labels);
  for (const k of Object.keys(out)) if (k.startsWith(GEAR_OWN_LABEL_PREFIX)) delete out[k];
  return out;
}

function info(rec: SnapshotRecord): SnapshotInfo {
  return { name: rec.name, parent: rec.parent, kind: rec.kind, labels: { ...rec.labels }, created: rec.created, updated: rec.updated };
}

/** Serialises metadata mutations; reads go straight to the index. */
class Mutex {
  private tail: Promise<void> = Promise.resolve();
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

export class Snapshotter {
  private readonly layers: SnapshotLayers;
  private readonly meta: MetaStore;
  private readonly log: Logger | undefined;
  /** Live snapshots by key/name. Records being created are included (their key is taken). */
  private readonly byName = new Map<string, SnapshotRecord>();
  /** Records whose removal has started but not finished (layer id → record). */
  private readonly removing = new Map<string, SnapshotRecord>();
  private readonly lock = new Mutex();
  /** Background work (layer removals) that shutdown waits for. */
  private readonly pending = new Set<Promise<void>>();
  /** Remote snapshots (remote.ts), when enabled. */
  private remote: RemotePrepare | undefined;
  private fillEmpty: FillEmpty | undefined;

  private constructor(opts: SnapshotterOptions) {
    this.layers = opts.layers;
    this.meta = new MetaStore(opts.metaRoot, opts.logger);
    this.log = opts.logger;
  }

  /** Loads the records and repairs what a crash left (see metastore.ts). */
  static async open(opts: SnapshotterOptions): Promise<Snapshotter> {
    const s = new Snapshotter(opts);
    await s.recover();
    return s;
  }

  private async recover(): Promise<void> {
    const { records, broken } = await this.meta.load();
    for (const layer of broken) await this.discard(layer, 'its record is unreadable');
    const live = new Map<string, SnapshotRecord>();
    for (const rec of records) {
      if (rec.state) {
        await this.discard(rec.layer, rec.state === 'creating' ? 'its Prepare/View never completed' : 'its Remove never completed');
      } else if (!(await this.layers.exists(rec.layer))) {
        this.log?.warn({ snapshot: rec.name, layer: rec.layer }, 'snapshot layer is missing; dropping the record');
        await this.meta.delete(rec.layer);
      } else if (live.has(rec.name)) {
        // Cannot happen with atomic writes; keep the committed one if it does.
        const other = live.get(rec.name)!;
        const drop = other.kind === 'committed' ? rec : other;
        if (drop === other) live.set(rec.name, rec);
        await this.discard(drop.layer, `duplicate record for ${rec.name}`);
      } else {
        live.set(rec.name, rec);
      }
    }
    // Records whose parent is gone cannot be mounted; drop them, children first
    // is unnecessary since a missing parent is found again on the next pass.
    for (let changed = true, rounds = 0; changed && rounds < 10_000; rounds++) {
      changed = false;
      for (const rec of live.values()) {
        const p = rec.parent ? live.get(rec.parent) : undefined;
        if (rec.parent && (!p || p.kind !== 'committed')) {
          live.delete(rec.name);
          await this.discard(rec.layer, `its parent ${rec.parent} is missing`);
          changed = true;
        }
      }
    }
    for (const rec of live.values()) this.byName.set(rec.name, rec);
    this.log?.info({ dir: this.meta.dir, snapshots: this.byName.size }, 'snapshot metadata open');
  }

  /** Removes a layer of ours and its record (repair path; failures are logged). */
  private async discard(layer: string, why: string): Promise<void> {
    try {
      await this.layers.remove(layer);
      await this.meta.delete(layer);
      this.log?.warn({ layer }, `removed snapshot layer: ${why}`);
    } catch (err) {
      this.log?.error({ layer, err: describeError(err) }, `cannot remove snapshot layer (${why})`);
    }
  }

  private lookup(key: string): SnapshotRecord {
    const rec = key ? this.byName.get(key) : undefined;
    if (!rec || rec.state) throw notFound(`snapshot ${key}: not found`);
    return rec;
  }

  /** Parents of a snapshot, nearest first. */
  private parents(rec: SnapshotRecord): SnapshotRecord[] {
    const out: SnapshotRecord[] = [];
    for (let cur = rec.parent; cur; ) {
      const p = this.byName.get(cur);
      if (!p) throw failedPrecondition(`snapshot ${rec.name}: parent ${cur} is missing`);
      out.push(p);
      if (out.length > 10_000) throw failedPrecondition(`snapshot ${rec.name}: parent chain loops`);
      cur = p.parent;
    }
    return out;
  }

  // ---- remote snapshots (remote.ts) ------------------------------------------

  /** Lets `fn` answer Prepares that carry containerd's remote-snapshot labels. */
  setRemotePrepare(fn: RemotePrepare | undefined, fill?: FillEmpty): void {
    this.remote = fn;
    this.fillEmpty = fill;
  }

  /** Marks a remote snapshot's empty layer as filled with its content (usage measured again). */
  async markFilled(name: string, usage: Usage): Promise<void> {
    await this.lock.run(async () => {
      const cur = this.lookup(name);
      const next: SnapshotRecord = { ...cur, labels: { ...cur.labels, [GEAR_REMOTE_LABEL]: 'filled' }, usage, updated: nowNs() };
      await this.meta.write(next);
      this.byName.set(name, next);
    });
  }

  /** A live snapshot's record (a copy), or undefined. */
  recordOf(name: string): Readonly<SnapshotRecord> | undefined {
    const rec = this.byName.get(name);
    return rec && !rec.state ? { ...rec, labels: { ...rec.labels } } : undefined;
  }

  /**
   * Reserves a layer id for work that is not a snapshot yet (a Gear index
   * layer being built): a record in state `creating` under `name`, so that a
   * crash before adoptCommitted leaves a layer the next start removes.
   */
  async reserveLayer(layer: string, name: string): Promise<void> {
    await this.lock.run(async () => {
      if (this.byName.has(name)) throw alreadyExists(`snapshot ${name}: already exists`);
      const t = nowNs();
      const rec: SnapshotRecord = { layer, name, kind: 'committed', parent: '', labels: {}, created: t, updated: t, state: 'creating' };
      await this.meta.write(rec);
      this.byName.set(name, rec);
    });
  }

  /** True when the store layer is a Gear index layer. */
  layerIsGearIndex(layer: string): boolean {
    return this.layers.lowerOf(layer).gear;
  }

  /** The diff directory of a store layer. */
  async diffDirOf(layer: string): Promise<string> {
    const dir = (await this.layers.metadata(layer)).UpperDir;
    if (!dir) throw new GearError('Internal', `layer ${layer} has no diff directory`);
    return dir;
  }

  /** Drops a reservation (its layer is the caller's to remove). */
  async releaseLayer(name: string): Promise<void> {
    await this.lock.run(async () => {
      const rec = this.byName.get(name);
      if (!rec || rec.state !== 'creating') return;
      this.byName.delete(name);
      await this.meta.delete(rec.layer);
    });
  }

  /**
   * Records an existing layer of ours as the committed snapshot `name` on
   * `parent` (a remote snapshot). `reserved` names the reservation that holds
   * the layer, if any. Fails with AlreadyExists when the name is taken.
   */
  async adoptCommitted(a: { name: string; parent: string; labels: Record<string, string>; layer: string; usage: Usage; reserved?: string }): Promise<void> {
    const clean = cleanLabels(a.labels);
    await this.lock.run(async () => {
      if (this.byName.has(a.name)) throw alreadyExists(`committed snapshot ${a.name}: already exists`);
      if (a.parent) {
        const p = this.byName.get(a.parent);
        if (!p || p.state || p.kind !== 'committed') throw notFound(`parent snapshot ${a.parent}: not found`);
      }
      const t = nowNs();
      const rec: SnapshotRecord = { layer: a.layer, name: a.name, kind: 'committed', parent: a.parent, labels: clean, created: t, updated: t, usage: a.usage };
      await this.meta.write(rec);
      if (a.reserved && this.byName.get(a.reserved)?.layer === a.layer) this.byName.delete(a.reserved);
      this.byName.set(a.name, rec);
    });
  }

  // ---- verbs -----------------------------------------------------------------

  prepare(key: string, parent: string, labels?: Record<string, string>): Promise<MountSpec[]> {
    return this.create('active', key, parent, labels);
  }

  view(key: string, parent: string, labels?: Record<string, string>): Promise<MountSpec[]> {
    return this.create('view', key, parent, labels);
  }

  private async create(kind: 'active' | 'view', key: string, parent: string, labels?: Record<string, string>): Promise<MountSpec[]> {
    if (!key) throw invalidArgument('snapshot key must not be empty');
    const clean = clientLabels(labels);
    if (kind === 'active' && this.remote && (await this.remote(key, parent, clean))) {
      // containerd's remote-snapshot protocol: the target exists now; containerd finds it with List and skips the layer.
      throw alreadyExists(`target snapshot ${clean['containerd.io/snapshot.ref']}: served by Gear (remote snapshot)`);
    }
    const rec = await this.lock.run(async () => {
      if (this.byName.has(key)) throw alreadyExists(`snapshot ${key}: already exists`);
      let parentLayer = '';
      if (parent) {
        const p = this.byName.get(parent);
        if (!p || p.state) throw notFound(`parent snapshot ${parent}: not found`);
        if (p.kind !== 'committed') throw invalidArgument(`parent ${parent} is not a committed snapshot`);
        parentLayer = p.layer;
      }
      // A container's root (not an image unpack) on a chain without a Gear index layer: warned about, or refused before anything exists.
      const created = kind === 'active' && !isImageUnpack(key, labels) ? this.layers.admitContainer?.(clientKey(key).key, parentLayer, clientKey(parent).key) : undefined;
      const t = nowNs();
      const rec: SnapshotRecord = {
        layer: randomBytes(8).toString('hex'),
        name: key,
        kind,
        parent,
        labels: clean,
        created: t,
        updated: t,
        state: 'creating',
      };
      await this.meta.write(rec);
      this.byName.set(key, rec);
      try {
        if (kind === 'active') await this.layers.create(rec.layer, parentLayer, 'rw');
        else await this.layers.create(rec.layer, '', 'ro');
        delete rec.state;
        await this.meta.write(rec);
        created?.();
      } catch (err) {
        this.byName.delete(key);
        await this.layers.remove(rec.layer).catch(() => undefined);
        await this.meta.delete(rec.layer).catch(() => undefined);
        throw err;
      }
      return rec;
    });
    try {
      const mounts = await this.mountsOf(rec);
      this.log?.debug({ key, parent, kind, layer: rec.layer }, 'created snapshot');
      return mounts;
    } catch (err) {
      // Refused (e.g. a chain too long to mount): a refused call leaves no snapshot behind.
      await this.remove(key).catch((e: unknown) => this.log?.warn({ key, err: describeError(e) }, 'could not undo a refused snapshot'));
      throw err;
    }
  }

  /** Active snapshots that are containers (not unpacks): layer id → key (gear stats). */
  containerLayers(): Map<string, string> {
    const out = new Map<string, string>();
    for (const r of this.byName.values()) if (r.kind === 'active' && !r.state && !isImageUnpack(r.name, r.labels)) out.set(r.layer, clientKey(r.name).key);
    return out;
  }

  async mounts(key: string): Promise<MountSpec[]> {
    const rec = this.lookup(key);
    if (rec.kind === 'committed') throw failedPrecondition(`snapshot ${key} is committed; only active snapshots and views have mounts`);
    return this.mountsOf(rec);
  }

  private async mountsOf(rec: SnapshotRecord): Promise<MountSpec[]> {
    const parents = await this.visibleParents(rec);
    const diffOf = async (layer: string) => {
      const dir = (await this.layers.metadata(layer)).UpperDir;
      if (!dir) throw new GearError('Internal', `layer ${layer} has no diff directory`);
      return dir;
    };
    const ro = rec.kind === 'view' ? 'ro' : 'rw';
    if (parents.some((p) => this.layers.lowerOf(p.layer).gear)) return this.gearMounts(rec, parents);
    if (parents.length === 0) return [{ type: 'bind', source: await diffOf(rec.layer), options: [ro, 'rbind'] }];
    if (rec.kind === 'view' && parents.length === 1) {
      return [{ type: 'bind', source: await diffOf(parents[0]!.layer), options: ['ro', 'rbind'] }];
    }
    const lowers: string[] = [];
    for (const p of parents) lowers.push(await diffOf(p.layer));
    const options = ['index=off'];
    if (rec.kind === 'active') {
      const meta = await this.layers.metadata(rec.layer);
      if (!meta.WorkDir || !meta.UpperDir) throw new GearError('Internal', `layer ${rec.layer} has no upper/work directory`);
      options.push(`workdir=${meta.WorkDir}`, `upperdir=${meta.UpperDir}`);
    }
    options.push(`lowerdir=${lowers.join(':')}`);
    return [{ type: 'overlay', source: 'overlay', options }];
  }

  /**
   * The parents whose content a mount shows, nearest first: all of them, or,
   * with a Gear index layer among them, those down to the nearest index layer.
   * An index layer holds its image's whole tree, so what lies below it (only
   * remote snapshots' empty layers, or layers of the original image that the
   * index replaces) is never shown. A remote snapshot's empty layer that
   * would be shown is first filled with its real content (remote.ts), or,
   * when that cannot be done, refused: it does not hold its layer's files.
   */
  private async visibleParents(rec: SnapshotRecord): Promise<SnapshotRecord[]> {
    const all = this.parents(rec);
    const gear = all.findIndex((p) => this.layers.lowerOf(p.layer).gear);
    let shown = gear < 0 ? all : all.slice(0, gear + 1);
    const isEmpty = (p: SnapshotRecord) => p.labels[GEAR_REMOTE_LABEL] === 'empty';
    if (shown.some(isEmpty) && this.fillEmpty) {
      try {
        await this.fillEmpty(shown.filter(isEmpty).reverse());
      } catch (err) {
        throw failedPrecondition(
          `snapshot ${rec.name}: it sits on layers that Gear served from an attached Gear index (remote snapshots, empty of their own files), and filling them with their content failed: ${describeError(err)}; ` +
            'make the registry reachable, or remove the Gear-served image (ctr image rm / docker rmi, then let containerd garbage-collect) so that containerd unpacks the layers again',
          err,
        );
      }
      shown = shown.map((p) => this.byName.get(p.name) ?? p);
    }
    const empty = shown.find(isEmpty);
    if (empty) {
      throw failedPrecondition(
        `snapshot ${rec.name}: its parent ${empty.name} is a layer that Gear served from an attached Gear index (remote snapshot) and holds none of its own files, ` +
          'but this snapshot is not on that Gear index (another image shares the layer); remove the Gear-served image (ctr image rm / docker rmi, then let containerd garbage-collect) so that containerd unpacks the layer again, then retry',
      );
    }
    return shown;
  }

  /** Mounts of a snapshot with a Gear index layer among its parents (see the header). */
  private async gearMounts(rec: SnapshotRecord, parents: SnapshotRecord[]): Promise<MountSpec[]> {
    const lowers = parents.map((p) => this.layers.lowerOf(p.layer).short);
    const options = [...GEAR_OVERLAY_OPTIONS];
    if (rec.kind === 'view') options.unshift('ro');
    else {
      const meta = await this.layers.metadata(rec.layer);
      if (!meta.WorkDir || !meta.UpperDir) throw new GearError('Internal', `layer ${rec.layer} has no upper/work directory`);
      options.push(`workdir=${meta.WorkDir}`, `upperdir=${meta.UpperDir}`);
    }
    options.push(`lowerdir=${[lowers.join(':'), ...this.layers.dataLowers].join('::')}`);
    const size = options.reduce((n, o) => n + Buffer.byteLength(o) + 1, 0);
    if (size >= MAX_GEAR_MOUNT_OPTIONS) {
      throw failedPrecondition(
        `snapshot ${rec.name}: its ${parents.length} layers on a Gear index need ${size} bytes of overlay options, over containerd's ${MAX_GEAR_MOUNT_OPTIONS}; ` +
          'use a shorter gear root (--root) or an image with fewer layers above the Gear index',
      );
    }
    return [{ type: 'overlay', source: 'overlay', options }];
  }

  async commit(name: string, key: string, labels?: Record<string, string>): Promise<void> {
    if (!name) throw invalidArgument('snapshot name must not be empty');
    const clean = clientLabels(labels);
    const active = this.lookup(key);
    if (active.kind !== 'active') throw failedPrecondition(`snapshot ${key} is not active`);
    // Measured before taking the lock: the active snapshot no longer changes
    // once containerd commits it (it unmounts first).
    const usage = await this.usageOf(active);
    // A base layer that containerd extracted from a Gear index layer tar becomes
    // a lazy Gear index layer (outside the lock: it may take seconds; idempotent).
    if (!active.parent) {
      const gear = await this.layers.adoptIndexForm(active.layer);
      if (gear) this.log?.info({ key, name, layer: active.layer, files: gear.files, location: gear.location }, 'committed a Gear index layer');
    }
    await this.lock.run(async () => {
      const cur = this.lookup(key);
      if (cur.kind !== 'active') throw failedPrecondition(`snapshot ${key} is not active`);
      if (this.byName.has(name)) throw alreadyExists(`committed snapshot ${name}: already exists`);
      const t = nowNs();
      // Labels are replaced, not inherited (as containerd's storage does).
      const next: SnapshotRecord = { ...cur, name, kind: 'committed', labels: clean, created: t, updated: t, usage };
      await this.meta.write(next);
      this.byName.delete(key);
      this.byName.set(name, next);
    });
    this.log?.debug({ key, name, layer: active.layer }, 'committed snapshot');
  }

  async remove(key: string): Promise<void> {
    const rec = await this.lock.run(async () => {
      const rec = this.lookup(key);
      for (const other of this.byName.values()) {
        if (other.parent === key) throw failedPrecondition(`cannot remove snapshot ${key} with child ${other.name}`);
      }
      const doomed: SnapshotRecord = { ...rec, state: 'removing' };
      await this.meta.write(doomed);
      this.byName.delete(key);
      this.removing.set(rec.layer, doomed);
      return doomed;
    });
    // The key is gone once the record says "removing"; the data goes now, and
    // a failure here is retried by Cleanup or at the next start.
    await this.track(this.finishRemoval(rec));
    this.log?.debug({ key, layer: rec.layer }, 'removed snapshot');
  }

  private async finishRemoval(rec: SnapshotRecord): Promise<void> {
    try {
      await this.layers.remove(rec.layer);
      await this.meta.delete(rec.layer);
      this.removing.delete(rec.layer);
    } catch (err) {
      this.log?.error({ snapshot: rec.name, layer: rec.layer, err: describeError(err) }, 'removing snapshot data failed; Cleanup will retry');
    }
  }

  async stat(key: string): Promise<SnapshotInfo> {
    return info(this.lookup(key));
  }

  /**
   * Updates labels. Paths: "labels" (replace all) or "labels.<key>" (set or,
   * when absent or empty in info, delete one). No paths: replace all labels.
   * Name, parent, kind and timestamps are immutable: naming them is an error,
   * and their values in info are ignored.
   */
  async update(next: SnapshotInfo, paths: string[]): Promise<SnapshotInfo> {
    const given = next.labels ?? {};
    cleanLabels(given);
    return this.lock.run(async () => {
      const cur = this.lookup(next.name);
      let labels = { ...cur.labels };
      if (paths.length === 0) labels = { ...given };
      for (const p of paths) {
        if (p === 'labels') labels = { ...given };
        else if (p.startsWith('labels.')) {
          const k = p.slice('labels.'.length);
          if (given[k] !== undefined) labels[k] = given[k];
          else delete labels[k];
        } else throw invalidArgument(`cannot update ${JSON.stringify(p)} field on snapshot ${JSON.stringify(next.name)}`);
      }
      // Gear's own labels stay as they were, whatever the client asked (an erased `empty` would show a layer that holds none of its files).
      const updatedLabels = clientLabels(labels);
      for (const [k, v] of Object.entries(cur.labels)) if (k.startsWith(GEAR_OWN_LABEL_PREFIX)) updatedLabels[k] = v;
      const updated: SnapshotRecord = { ...cur, labels: updatedLabels, updated: nowNs() };
      await this.meta.write(updated);
      this.byName.set(updated.name, updated);
      return info(updated);
    });
  }

  /** Snapshots matching any of the filters (containerd's filter syntax). */
  async list(filters: string[]): Promise<SnapshotInfo[]> {
    const f = parseFilters(filters);
    const out: SnapshotInfo[] = [];
    for (const rec of this.byName.values()) {
      if (rec.state) continue;
      const matched = f.match((fieldpath) => {
        switch (fieldpath[0]) {
          case 'kind':
            return [rec.kind, true];
          case 'name':
            return [rec.name, true];
          case 'parent':
            return [rec.parent, true];
          case 'labels': {
            const v = rec.labels[fieldpath.slice(1).join('.')];
            return v === undefined ? ['', false] : [v, true];
          }
          default:
            return ['', false];
        }
      });
      if (matched) out.push(info(rec));
    }
    return out;
  }

  async usage(key: string): Promise<Usage> {
    return this.usageOf(this.lookup(key));
  }

  private async usageOf(rec: SnapshotRecord): Promise<Usage> {
    if (rec.kind === 'committed' && rec.usage) return rec.usage;
    const dir = (await this.layers.metadata(rec.layer)).UpperDir;
    if (!dir) throw new GearError('Internal', `layer ${rec.layer} has no diff directory`);
    return diskUsage(dir);
  }

  /** Finishes removals that failed earlier. */
  async cleanup(): Promise<void> {
    for (const rec of [...this.removing.values()]) await this.track(this.finishRemoval(rec));
  }

  private async track(p: Promise<void>): Promise<void> {
    this.pending.add(p);
    try {
      await p;
    } finally {
      this.pending.delete(p);
    }
  }

  /** Waits for in-flight background work (shutdown). */
  async drain(): Promise<void> {
    await Promise.allSettled([...this.pending]);
  }
}
