/**
 * The snapshotter's side of remote snapshots (snapshotter.ts), with the real
 * core store and no registry: a Prepare that the remote hook answers is
 * ALREADY_EXISTS with the committed target in place, a Prepare it declines is
 * an ordinary one, and a Gear-served *empty* layer is never shown by a mount:
 * it is filled first (bottom first) when a fill hook is there, and the mount
 * is refused with the remedy when there is none or the fill fails.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { GEAR_REMOTE_LABEL, Snapshotter } from '../../src/frontends/snapshotter/snapshotter.js';

const REF = 'containerd.io/snapshot.ref';
let root: string;
let store: Awaited<ReturnType<typeof openLayerStore>>;
let sn: Snapshotter;

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-snremote-'));
  store = await openLayerStore({ root });
  sn = await Snapshotter.open({ layers: store, metaRoot: path.join(root, 'snapshotter') });
});

afterEach(async () => {
  await store.close?.();
  await fs.rm(root, { recursive: true, force: true });
});

/** An empty Gear-served layer as remote.ts makes it. */
async function emptyLayer(name: string, parent: string, layer: string): Promise<void> {
  await sn.reserveLayer(layer, `gear-remote-pending/${layer}`);
  await store.create(layer, '', 'ro');
  await sn.adoptCommitted({ name, parent, labels: { [REF]: name, [GEAR_REMOTE_LABEL]: 'empty' }, layer, usage: { size: 0, inodes: 1 }, reserved: `gear-remote-pending/${layer}` });
}

describe('remote Prepare', () => {
  it('answers ALREADY_EXISTS when the hook created the target, and prepares normally when it declines', async () => {
    const calls: string[] = [];
    sn.setRemotePrepare(async (key, parent, labels) => {
      calls.push(key);
      if (labels['decline']) return false;
      await emptyLayer(labels[REF]!, parent, 'aaaaaaaaaaaaaaa1');
      return true;
    });
    const err = await sn.prepare('ns/1/extract-x sha256:c1', '', { [REF]: 'sha256:c1' }).catch((e: unknown) => e);
    expect(isClass(err, 'AlreadyExists')).toBe(true);
    const info = await sn.stat('sha256:c1');
    expect(info).toMatchObject({ kind: 'committed', parent: '', labels: { [REF]: 'sha256:c1', [GEAR_REMOTE_LABEL]: 'empty' } });
    // containerd then finds it with this filter
    expect((await sn.list([`labels."${REF}"==sha256:c1,parent==""`])).map((i) => i.name)).toEqual(['sha256:c1']);
    // the key itself was not taken
    await expect(sn.stat('ns/1/extract-x sha256:c1')).rejects.toThrow(/not found/);
    const mounts = await sn.prepare('ns/2/extract-y sha256:c9', '', { [REF]: 'sha256:c9', decline: 'yes' });
    expect(mounts[0]?.type).toBe('bind');
    expect(calls).toHaveLength(2);
    // Views never go to the hook.
    await sn.view('ns/3/view', '', {});
    expect(calls).toHaveLength(2);
  });
});

describe('an empty Gear-served layer is never shown', () => {
  it('without a fill hook, a snapshot on it is refused with the remedy and leaves nothing', async () => {
    await emptyLayer('sha256:c1', '', 'bbbbbbbbbbbbbbb1');
    const err = await sn.prepare('ns/5/child', 'sha256:c1').catch((e: unknown) => e);
    expect(isClass(err, 'FailedPrecondition')).toBe(true);
    expect(String((err as Error).message)).toMatch(/Gear served from an attached Gear index.*remove the Gear-served image/);
    await expect(sn.stat('ns/5/child')).rejects.toThrow(/not found/);
  });

  it('with a fill hook, the empty layers are filled bottom first before the mount is made', async () => {
    await emptyLayer('sha256:c1', '', 'ccccccccccccccc1');
    await emptyLayer('sha256:c2', 'sha256:c1', 'ccccccccccccccc2');
    const order: string[] = [];
    sn.setRemotePrepare(
      async () => false,
      async (recs) => {
        for (const r of recs) {
          order.push(r.name);
          await fs.writeFile(path.join(await sn.diffDirOf(r.layer), `from-${r.name.slice(7)}`), 'x');
          await sn.markFilled(r.name, { size: 1, inodes: 2 });
        }
      },
    );
    const mounts = await sn.prepare('ns/6/child', 'sha256:c2');
    expect(order).toEqual(['sha256:c1', 'sha256:c2']);
    expect(mounts[0]?.type).toBe('overlay');
    expect((await sn.stat('sha256:c1')).labels[GEAR_REMOTE_LABEL]).toBe('filled');
    // Filled once: the next snapshot on them does not fill again.
    await sn.prepare('ns/7/child', 'sha256:c2');
    expect(order).toHaveLength(2);
  });

  it('a failing fill refuses the snapshot with the cause and the remedy', async () => {
    await emptyLayer('sha256:c1', '', 'ddddddddddddddd1');
    sn.setRemotePrepare(
      async () => false,
      async () => {
        throw new Error('registry unreachable');
      },
    );
    const err = await sn.prepare('ns/8/child', 'sha256:c1').catch((e: unknown) => e);
    expect(isClass(err, 'FailedPrecondition')).toBe(true);
    expect(String((err as Error).message)).toMatch(/registry unreachable.*make the registry reachable/);
  });

  it('a crash between reservation and adoption leaves a layer the next start removes', async () => {
    await sn.reserveLayer('eeeeeeeeeeeeeee1', 'gear-remote-pending/eeeeeeeeeeeeeee1');
    await store.create('eeeeeeeeeeeeeee1', '', 'ro');
    expect(await store.exists('eeeeeeeeeeeeeee1')).toBe(true);
    const again = await Snapshotter.open({ layers: store, metaRoot: path.join(root, 'snapshotter') });
    expect(await store.exists('eeeeeeeeeeeeeee1')).toBe(false);
    expect(await again.list([])).toEqual([]);
  });
});

describe("Gear's own remote label", () => {
  it('a client can neither erase it (Update) nor set it (Prepare, Commit)', async () => {
    await emptyLayer('sha256:base', '', 'aaaaaaaaaaaaaab1');
    // Update replacing all labels, and one naming the key: the `empty` mark stays.
    await sn.update({ name: 'sha256:base', labels: { other: 'x' } } as never, ['labels']);
    await sn.update({ name: 'sha256:base', labels: {} } as never, [`labels.${GEAR_REMOTE_LABEL}`]);
    const info = await sn.stat('sha256:base');
    expect(info.labels).toMatchObject({ other: 'x', [GEAR_REMOTE_LABEL]: 'empty' });
    // A client's Prepare and Commit cannot mark a layer as Gear-served.
    await sn.prepare('k1', '', { [GEAR_REMOTE_LABEL]: 'index' });
    const src = 'containerd.io/snapshot/gear.source-digest';
    await sn.commit('c1', 'k1', { [GEAR_REMOTE_LABEL]: 'empty', [src]: `sha256:${'0'.repeat(64)}` });
    expect((await sn.stat('c1')).labels[GEAR_REMOTE_LABEL]).toBeUndefined();
    expect((await sn.stat('c1')).labels[src]).toBeUndefined();
  });
});
