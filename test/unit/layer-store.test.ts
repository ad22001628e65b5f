import { execFileSync, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import tarStream from 'tar-stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { openLayerStore, MAX_LAYER_DEPTH } from '../../src/core/layers/store.js';
import { isMountPoint, mountsUnder, unmountAllUnder } from '../../src/core/sys/mounts.js';

type Entry = { name: string; body?: string; type?: 'file' | 'directory' | 'symlink'; linkname?: string; mode?: number };

function tarOf(entries: Entry[]): Readable {
  const pack = tarStream.pack();
  for (const e of entries) {
    if (e.type === 'directory') pack.entry({ name: e.name, type: 'directory', mode: e.mode ?? 0o755 });
    else if (e.type === 'symlink') pack.entry({ name: e.name, type: 'symlink', linkname: e.linkname! });
    else pack.entry({ name: e.name, mode: e.mode ?? 0o644 }, e.body ?? '');
  }
  pack.finalize();
  return Readable.from(pack as unknown as AsyncIterable<Buffer>);
}

let root: string;

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-store-'));
});

afterEach(async () => {
  unmountAllUnder(root);
  await fs.rm(root, { recursive: true, force: true });
});

describe('layer store', () => {
  it('builds a parent chain, mounts the merged view, and unmounts on the last put', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf([{ name: 'etc/', type: 'directory' }, { name: 'etc/a', body: 'base-a' }, { name: 'etc/b', body: 'base-b' }]));
    await store.create('top', 'base', 'ro');
    await store.applyDiff('top', 'base', tarOf([{ name: 'etc/', type: 'directory' }, { name: 'etc/a', body: 'top-a' }, { name: 'etc/.wh.b' }]));
    await store.create('ctr', 'top', 'rw');

    // A base layer needs no mount: its own dir is the view.
    expect(await store.get('base')).toBe(path.join(root, 'layers', 'base', 'diff'));

    const merged = await store.get('ctr');
    expect(isMountPoint(merged)).toBe(true);
    expect(await fs.readFile(path.join(merged, 'etc/a'), 'utf8')).toBe('top-a');
    expect(existsSync(path.join(merged, 'etc/b'))).toBe(false);
    await fs.writeFile(path.join(merged, 'etc/c'), 'new');
    expect(await fs.readFile(path.join(root, 'layers/ctr/diff/etc/c'), 'utf8')).toBe('new');

    const again = await store.get('ctr');
    expect(again).toBe(merged);
    await store.put('ctr');
    expect(isMountPoint(merged)).toBe(true); // one reference left
    await store.put('ctr');
    expect(isMountPoint(merged)).toBe(false);

    // A read-only image layer's view is read-only.
    const ro = await store.get('top');
    await expect(fs.writeFile(path.join(ro, 'x'), 'y')).rejects.toMatchObject({ code: 'EROFS' });
    await store.put('top');
  });

  it('answers unknown ids, duplicate creates and bad ids with classed errors', async () => {
    const store = await openLayerStore({ root });
    await expect(store.get('nope')).rejects.toSatisfy((e) => isClass(e, 'NotFound'));
    await expect(store.create('child', 'missing-parent', 'ro')).rejects.toSatisfy((e) => isClass(e, 'NotFound'));
    await store.create('dup', '', 'ro');
    await expect(store.create('dup', '', 'ro')).rejects.toSatisfy((e) => isClass(e, 'AlreadyExists'));
    await expect(store.create('../evil', '', 'ro')).rejects.toSatisfy((e) => isClass(e, 'InvalidArgument'));
    await expect(store.create('a/b', '', 'ro')).rejects.toSatisfy((e) => isClass(e, 'InvalidArgument'));
    await expect(store.create('opt', '', 'rw', { storageOpt: { size: '10G' } })).rejects.toSatisfy((e) =>
      isClass(e, 'InvalidArgument'),
    );
    expect(await store.exists('dup')).toBe(true);
    expect(await store.exists('../dup')).toBe(false);
    await store.remove('never-existed'); // idempotent
    await store.remove('dup');
    expect(await store.exists('dup')).toBe(false);
    expect(existsSync(path.join(root, 'layers', 'dup'))).toBe(false);
  });

  it('leaves nothing of a refused layer behind', async () => {
    const store = await openLayerStore({ root });
    await store.create('bad', '', 'ro');
    await expect(store.applyDiff('bad', '', tarOf([{ name: 'ok', body: 'x' }, { name: '../escape', body: 'x' }]))).rejects.toSatisfy(
      (e) => isClass(e, 'InvalidArgument'),
    );
    expect(await fs.readdir(path.join(root, 'layers/bad/diff'))).toEqual([]);
    expect(existsSync(path.join(root, 'layers/bad/applying'))).toBe(false);
    expect(existsSync(path.join(root, 'escape'))).toBe(false);
  });

  it(`mounts a ${MAX_LAYER_DEPTH}-layer chain within the mount option limit and refuses one more`, async () => {
    const store = await openLayerStore({ root });
    let parent = '';
    for (let i = 0; i < MAX_LAYER_DEPTH; i++) {
      const id = `l${String(i).padStart(3, '0')}`.padEnd(64, 'f');
      await store.create(id, parent, 'ro');
      await store.applyDiff(id, parent, tarOf([{ name: `f${i}`, body: String(i) }]));
      parent = id;
    }
    const merged = await store.get(parent);
    expect((await fs.readdir(merged)).length).toBe(MAX_LAYER_DEPTH);
    expect(await fs.readFile(path.join(merged, 'f0'), 'utf8')).toBe('0');
    await store.put(parent);
    await expect(store.create('one-too-many', parent, 'rw')).rejects.toSatisfy((e) => isClass(e, 'FailedPrecondition'));
  });

  it('never unmounts a mount point at its own root (a dedicated disk, the plugin\'s PropagatedMount)', async () => {
    // Regression: open() once took the mount at ROOT for a stale one and detached it.
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=64m', 'gear-root-test', root]);
    try {
      const store = await openLayerStore({ root });
      expect(isMountPoint(root)).toBe(true);
      await store.create('base', '', 'ro');
      await store.applyDiff('base', '', tarOf([{ name: 'a', body: 'a' }]));
      await store.create('ctr', 'base', 'rw');
      const merged = await store.get('ctr');
      await store.cleanup();
      expect(isMountPoint(merged)).toBe(false);
      expect(isMountPoint(root)).toBe(true);
      await openLayerStore({ root }); // a restart must keep it too
      expect(isMountPoint(root)).toBe(true);
      expect(await fs.readFile(path.join(root, 'layers/base/diff/a'), 'utf8')).toBe('a');
    } finally {
      unmountAllUnder(root);
    }
  });

  it('adopts a mount that survived a restart and repairs debris on open', async () => {
    let store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf([{ name: 'a', body: 'a' }]));
    await store.create('ctr', 'base', 'rw');
    const merged = await store.get('ctr');

    // Debris a kill -9 could leave.
    await fs.mkdir(path.join(root, 'layers/.tmp-half-1234/diff'), { recursive: true });
    await fs.mkdir(path.join(root, 'layers/.trash-gone-1234/diff'), { recursive: true });
    await fs.mkdir(path.join(root, 'layers/norecord/diff'), { recursive: true });
    await fs.symlink('../layers/ghost/diff', path.join(root, 'l/DANGLINGLINKXXXXXXXXXXXXXX'));
    await store.create('halfapplied', '', 'ro');
    await fs.writeFile(path.join(root, 'layers/halfapplied/applying'), '');
    const baseLink = JSON.parse(await fs.readFile(path.join(root, 'layers/base/layer.json'), 'utf8')).link as string;
    await fs.rm(path.join(root, 'l', baseLink));

    store = await openLayerStore({ root }); // "restart"
    expect((await fs.readdir(path.join(root, 'layers'))).sort()).toEqual(['base', 'ctr']);
    expect(await fs.readdir(path.join(root, 'l'))).toHaveLength(2);
    expect(await fs.readlink(path.join(root, 'l', baseLink))).toBe('../layers/base/diff');
    expect(isMountPoint(merged)).toBe(true); // kept: a running container may use it

    // The surviving mount counts as one reference: get+put keeps it, the next put unmounts.
    await store.get('ctr');
    await store.put('ctr');
    expect(isMountPoint(merged)).toBe(true);
    await store.put('ctr');
    expect(isMountPoint(merged)).toBe(false);
  });

  it('is consistent after kill -9 at random moments', async () => {
    const child = path.join(import.meta.dirname, 'fixtures/store-churn.mjs');
    expect(existsSync(path.join(import.meta.dirname, '../../dist/core/layers/store.js')), 'run make build first').toBe(true);
    const rounds = 12;
    let progressed = 0;
    for (let round = 0; round < rounds; round++) {
      const proc = spawn(process.execPath, [child, root, String(round + 7)], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      proc.stdout.on('data', (d) => (out += d));
      proc.stderr.on('data', (d) => (err += d));
      const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
      // Wait until it has done some work, then kill it at a random moment.
      const deadline = Date.now() + 20_000;
      while (!out.includes('\n') && Date.now() < deadline && proc.exitCode === null) await new Promise((r) => setTimeout(r, 20));
      expect(err, 'churn child failed').toBe('');
      await new Promise((r) => setTimeout(r, 30 + Math.floor(Math.random() * 250)));
      proc.kill('SIGKILL');
      await exited;
      progressed += out.split('\n').filter(Boolean).length;

      const store = await openLayerStore({ root });
      const layers = (await fs.readdir(path.join(root, 'layers'))).sort();
      expect(layers.filter((n) => n.startsWith('.'))).toEqual([]);
      const links = await fs.readdir(path.join(root, 'l'));
      expect(links.length).toBe(layers.length);
      for (const id of layers) {
        const rec = JSON.parse(await fs.readFile(path.join(root, 'layers', id, 'layer.json'), 'utf8'));
        expect(rec.id).toBe(id);
        expect(existsSync(path.join(root, 'layers', id, 'applying'))).toBe(false);
        expect(await fs.readlink(path.join(root, 'l', rec.link))).toBe(`../layers/${id}/diff`);
        if (rec.parent) expect(layers).toContain(rec.parent);
      }
      for (const m of mountsUnder(root)) {
        const rel = path.relative(path.join(root, 'layers'), m.mountPoint).split('/');
        expect(rel[1]).toBe('merged');
        expect(layers).toContain(rel[0]);
      }
      // Every surviving layer still mounts and shows its files.
      for (const id of layers) {
        const rec = JSON.parse(await fs.readFile(path.join(root, 'layers', id, 'layer.json'), 'utf8'));
        const dir = await store.get(id);
        // A layer killed between create and applyDiff is legitimately empty.
        if (rec.size !== undefined) expect((await fs.readdir(dir)).length).toBeGreaterThan(0);
        await store.put(id);
      }
      await store.cleanup();
    }
    expect(progressed).toBeGreaterThan(rounds); // the children really did work before dying
  });
});
