/**
 * Vocabulary of the layer store (levels 2 and 3 of DESIGN.md).
 *
 * - A *layer* is identified by an opaque id chosen by the caller (Docker's
 *   64-hex cache-id, or a snapshot key). It has at most one *parent*.
 * - A *read-only* layer holds an image layer's content (filled once by
 *   applyDiff); a *read-write* layer is a container's writable layer (or
 *   Docker's "-init" layer).
 * - get() returns a directory showing the layer merged with all its parents,
 *   mounting an overlay when needed; put() releases it. Mounts are
 *   reference-counted; the last put() unmounts.
 */
import type { Readable } from 'node:stream';
import type { Change } from '../archive/changes.js';
import type { BlobLocation } from '../index/manifest.js';
import type { GearBlobTuple } from '../lazy/catalog.js';
import type { PackLoc } from '../fetcher/pack-types.js';

export type LayerKind = 'ro' | 'rw';

/** The persistent record of one layer (layers/<id>/layer.json). */
export interface LayerRecord {
  id: string;
  /** Parent layer id, or '' for a base layer. */
  parent: string;
  kind: LayerKind;
  /** Short name of this layer's diff dir under ROOT/l/ (keeps mount options short). */
  link: string;
  /** Ancestor links, nearest parent first: the overlay lowerdir stack below this layer. */
  lowers: string[];
  /** Creation time, ms since the epoch. */
  created: number;
  /** Size recorded by applyDiff, in bytes. */
  size?: number;
  /** Present for a Gear index layer: what its files are and where they live. */
  gear?: GearLayerInfo;
}

/**
 * A Gear index layer's record: diff/ holds the index form (what Get() shows),
 * index/ the metacopy tree that layers above it use as their lower.
 */
export interface GearLayerInfo {
  /** Regular files listed by the manifest. */
  files: number;
  /** Their total real size. */
  bytes: number;
  /** Where the Gear files live (absent: the index names no registry). */
  location?: BlobLocation;
  /**
   * Distinct Gear files: [content digest, size, stored blob digest?, stored blob size?] (v1/v2), or
   * [content digest, size, layout] (v3: where in `packs` its member or chunks are; catalog.ts).
   */
  blobs: GearBlobTuple[];
  /** Format v3: the packs of the index (absent in records of v1/v2 layers and of older daemons). */
  packs?: PackLoc[];
  /**
   * 'image': the index is layers/<id>/index.erofs, mounted at index/
   * (index-image.ts); absent: index/ is a directory tree (index-dir.ts).
   */
  form?: 'image';
}

export interface CreateOptions {
  /** Docker --storage-opt values; the store rejects keys it does not support. */
  storageOpt?: Record<string, string>;
}

export interface ApplyOptions {
  /**
   * An index layer's EROFS image is written after applyDiff returns
   * (pending-images.ts): for callers whose every mount goes through get()
   * (the graph driver). The snapshotter hands mount specs to containerd,
   * which mounts them itself, so it leaves this off.
   */
  deferIndexImage?: boolean;
}

export interface LayerStore {
  /** Absolute root directory of the store. */
  readonly root: string;

  create(id: string, parent: string, kind: LayerKind, opts?: CreateOptions): Promise<void>;
  /** Removes a layer; removing an unknown id succeeds (Docker retries removals). */
  remove(id: string): Promise<void>;
  exists(id: string): Promise<boolean>;
  /** Mounts (if needed) and returns the merged directory of the layer and its parents. */
  get(id: string): Promise<string>;
  /** Releases one get(); unmounts on the last one. */
  put(id: string): Promise<void>;
  /** Paths of the layer, as docker inspect shows them (LowerDir, UpperDir, WorkDir, MergedDir). */
  metadata(id: string): Promise<Record<string, string>>;
  /** Key/value pairs for docker info. */
  status(): Promise<Array<[string, string]>>;
  /** Unmounts everything the store mounted (daemon shutdown). */
  cleanup(): Promise<void>;
  /**
   * Releases what open() took (the lazy machinery: miss filesystem, pool,
   * registry connections). Layer mounts stay (running containers use them).
   */
  close?(): Promise<void>;

  /** Extracts a layer tar (plain, gzip or zstd) into a freshly created layer. Returns its size. */
  applyDiff(id: string, parent: string, tar: Readable, opts?: ApplyOptions): Promise<number>;
  /** A tar stream of what the layer changes relative to parent (OCI whiteouts). */
  diff(id: string, parent: string): Promise<Readable>;
  /** What the layer changes relative to parent (docker diff). */
  changes(id: string, parent: string): Promise<Change[]>;
  /** Bytes the layer adds relative to parent. */
  diffSize(id: string, parent: string): Promise<number>;
  /**
   * Optional (the core store has it): a container is about to be created on `parent`, its image's
   * top layer ('' for none). On an image without a Gear index layer it throws FailedPrecondition
   * when the store requires lazy images (--require-lazy), else returns a function to call once the
   * container is created, which counts and warns about it. Creates nothing. `image` names the
   * image for messages (default: the parent).
   */
  admitContainer?(id: string, parent: string, image?: string): (() => void) | undefined;
}

/** How a layer appears as the lower of the layers stacked on it. */
export interface LowerDir {
  /** index/ of a Gear index layer, else diff/ (absolute). */
  dir: string;
  /** The same dir through the layer's short link ROOT/l/<link> (absolute; keeps lowerdir options short). */
  short: string;
  /** True for a Gear index layer: mounts above it need the data-only lowers and metacopy options. */
  gear: boolean;
}

/**
 * Gear index layers whose content another unpacker extracted (containerd's
 * applier writes into the snapshot's own diff dir; the store never sees the
 * tar), and what a frontend needs to build lazy mounts itself.
 */
export interface IndexLayerAdoption {
  /**
   * Turns a parentless layer whose diff/ holds a Gear index form
   * (.gear/index.json, mode 0444, mtime 0, alone in .gear/) into a Gear index
   * layer, exactly as applyDiff does. Returns undefined (changing nothing)
   * when diff/ holds no index form; throws InvalidArgument when it holds one
   * whose manifest and tree disagree.
   */
  adoptIndexForm(id: string): Promise<GearLayerInfo | undefined>;
  lowerOf(id: string): LowerDir;
  /** Absolute data-only lowers of a mount above an index layer (ROOT/pool, ROOT/miss), in lookup order. */
  readonly dataLowers: string[];
}
