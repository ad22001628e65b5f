/**
 * Crash recovery of the snapshotter's metadata (src/frontends/snapshotter):
 * the states a kill -9 can leave between a record write and a layer
 * operation are built by hand, then the snapshotter is reopened on them.
 * Runs on the real layer store (root: it creates overlay-ready dirs).
 */
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openLayerStore } from '../../src/core/layers/store.js';
import { MetaStore, type SnapshotRecord } from '../../src/frontends/snapshotter/metastore.js';
import { nowNs, Snapshotter } from '../../src/frontends/snapshotter/snapshotter.js';

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

async function open(root: string) {
  const layers = await openLayerStore({ root });
  const sn = await Snapshotter.open({ layers, metaRoot: join(root, 'snapshotter') });
  return { layers, sn };
}

describe('snapshotter metadata after a crash', () => {
  it('drops half-created and half-removed snapshots with their layers, keeps the rest and foreign layers', async () => {
    const root = mkdtempSync('/tmp/gear-snrec-');
    dirs.push(root);
    const { layers, sn } = await open(root);
    await sn.prepare('ns/1/base-a', '');
    await sn.commit('ns/2/base', 'ns/1/base-a', { 'containerd.io/gc.root': 'x' });
    await sn.prepare('ns/3/child', 'ns/2/base');

    const meta = new MetaStore(join(root, 'snapshotter'));
    const t = nowNs();
    const rec = (layer: string, name: string, state?: SnapshotRecord['state']): SnapshotRecord => ({
      layer,
      name,
      kind: 'active',
      parent: '',
      labels: {},
      created: t,
      updated: t,
      ...(state ? { state } : {}),
    });
    // Crash inside Prepare: record says "creating", the layer was made.
    await meta.write(rec('00000000000000c1', 'ns/4/creating', 'creating'));
    await layers.create('00000000000000c1', '', 'rw');
    // Crash inside Prepare before the layer existed.
    await meta.write(rec('00000000000000c2', 'ns/5/creating-nolayer', 'creating'));
    // Crash inside Remove: record says "removing", the layer is still there.
    await meta.write(rec('00000000000000d1', 'ns/6/removing', 'removing'));
    await layers.create('00000000000000d1', '', 'rw');
    // A record whose layer vanished (not something we write, but survivable).
    await meta.write(rec('00000000000000e1', 'ns/7/no-layer'));
    // An interrupted atomic write, and a layer that is not ours (no record).
    writeFileSync(join(root, 'snapshotter/snapshots/.00000000000000f1.json.tmp-1234'), '{"trunc');
    await layers.create('foreign-layer', '', 'rw');

    const again = await open(root);
    const names = (await again.sn.list([])).map((i) => i.name).sort();
    expect(names).toEqual(['ns/2/base', 'ns/3/child']);
    expect(await again.layers.exists('00000000000000c1')).toBe(false);
    expect(await again.layers.exists('00000000000000d1')).toBe(false);
    expect(await again.layers.exists('foreign-layer')).toBe(true);
    expect(readdirSync(join(root, 'snapshotter/snapshots')).sort()).toHaveLength(2);

    // The survivors still work: labels kept, mounts resolvable, removal order enforced.
    expect((await again.sn.stat('ns/2/base')).labels).toEqual({ 'containerd.io/gc.root': 'x' });
    const [m] = await again.sn.mounts('ns/3/child');
    expect(m?.type).toBe('overlay');
    await expect(again.sn.remove('ns/2/base')).rejects.toMatchObject({ class: 'FailedPrecondition' });
    await again.sn.remove('ns/3/child');
    await again.sn.remove('ns/2/base');
    expect(await again.sn.list([])).toEqual([]);
    // The same key can be prepared again, and an existing key cannot.
    await again.sn.prepare('ns/4/creating', '');
    await expect(again.sn.prepare('ns/4/creating', '')).rejects.toMatchObject({ class: 'AlreadyExists' });
  });
});
