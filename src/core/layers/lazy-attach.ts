/**
 * Opening a store's lazy machinery over the layers it already has: the
 * runtime (pool, fetcher, miss filesystem), every index layer's files in the
 * catalog, and the pool's references made to agree with the layer records
 * (index layers removed while the daemon was down drop theirs; layers applied
 * right before a crash, whose references ApplyDiff writes in the background,
 * get theirs again).
 */
import { statfsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { openLazyRuntime, type LazyOptions, type LazyRuntime } from '../lazy/runtime.js';
import { errnoCode } from '../errors.js';
import { readMounts, unmount } from '../sys/mounts.js';
import { MAX_LAYER_DEPTH } from './records.js';
import type { LayerRecord } from './types.js';

/**
 * ROOT/miss must exist. After a crash it is the previous daemon's FUSE
 * mount with an aborted connection (any access: ENOTCONN); detach it
 * (lazily: container overlays still reference it) so that this run can
 * mount a fresh miss filesystem, or, lazy pull off, a plain dir.
 */
export async function ensureMissDir(root: string, log?: Logger): Promise<void> {
  const miss = path.join(root, 'miss');
  // Several crashes in a row can leave dead mounts stacked there.
  for (let i = 0; ; i++) {
    try {
      await fs.mkdir(miss, { recursive: true, mode: 0o755 });
      return;
    } catch (err) {
      if (errnoCode(err) !== 'ENOTCONN' || i >= 8) throw err;
      unmount(miss, { lazy: true });
      log?.info({ mountPoint: miss }, 'detached the miss filesystem of a previous daemon (its connection is gone)');
    }
  }
}

export async function attachLazyRuntime(root: string, opts: LazyOptions, records: Iterable<LayerRecord>, log?: Logger): Promise<LazyRuntime> {
  const lazy = await openLazyRuntime(root, opts, log);
  const gear = [...records].filter((r) => r.gear);
  for (const r of gear) lazy.catalog.add(r.id, r.gear!.location, r.gear!.blobs, r.gear!.packs);
  const owners = new Set(gear.map((r) => r.id));
  const recorded = new Set(lazy.pool.referenceOwners());
  for (const o of recorded) if (!owners.has(o)) await lazy.pool.dropReferences(o);
  for (const r of gear) {
    if (!recorded.has(r.id)) await lazy.pool.setReferenced(r.id, r.gear!.blobs.map((b) => b[0]));
  }
  return lazy;
}

/** The filesystem under dir, as `docker info` names it ("Backing Filesystem"). */
export function backingFilesystem(dir: string): string {
  try {
    const magic = statfsSync(dir).type;
    return ({ 0xef53: 'extfs', 0x58465342: 'xfs', 0x9123683e: 'btrfs', 0x01021994: 'tmpfs' } as Record<number, string>)[magic] ?? `0x${magic.toString(16)}`;
  } catch {
    return 'unknown';
  }
}

/**
 * The index layers that containers mounted before this run use: the index
 * parents of the mounts this store adopted (an index layer's own mount shows
 * its index form, with no data layers), and those named in the lowerdir of
 * overlays this store did not mount (containerd mounts snapshots itself) that
 * use ROOT/miss as a data layer (the snapshotter gives absolute ROOT/l/<link>
 * or ROOT/layers/<id>/index lowers; mountinfo shows them as given).
 */
export function indexLayersInUse(root: string, records: ReadonlyMap<string, LayerRecord>, mounted: Iterable<string>): Set<string> {
  const out = new Set<string>();
  for (const id of mounted) {
    let cur = records.get(id)?.parent;
    for (let depth = 0; cur && depth <= MAX_LAYER_DEPTH; depth++) {
      const p = records.get(cur);
      if (!p) break;
      if (p.gear) out.add(p.id);
      cur = p.parent;
    }
  }
  const miss = path.join(root, 'miss');
  const byLink = new Map<string, LayerRecord>();
  for (const r of records.values()) if (r.gear) byLink.set(r.link, r);
  if (byLink.size === 0) return out;
  const layersPrefix = path.join(root, 'layers') + '/';
  for (const m of readMounts()) {
    if (m.fsType !== 'overlay' || m.mountPoint.startsWith(layersPrefix)) continue;
    const opt = m.superOptions.split(/(?<!\\),/).find((o) => o.startsWith('lowerdir='));
    if (!opt) continue;
    const lowers = opt.slice('lowerdir='.length).split(/(?<!\\):/).filter(Boolean);
    if (!lowers.includes(miss)) continue;
    for (const l of lowers) {
      const rel = path.relative(root, l).split(path.sep);
      const rec =
        rel.length === 2 && rel[0] === 'l'
          ? byLink.get(rel[1]!)
          : rel.length === 3 && rel[0] === 'layers' && rel[2] === 'index'
            ? records.get(rel[1]!)
            : undefined;
      if (rec?.gear) out.add(rec.id);
    }
  }
  return out;
}
