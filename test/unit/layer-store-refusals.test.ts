/**
 * A refused mutating call of the layer store changes nothing (needs root:
 * overlay mounts). Above all: a second ApplyDiff on a layer that already has
 * content is refused without emptying its diff/ (it used to: the refusal went
 * through the failure path, which empties diff/).
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import tarStream from 'tar-stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { errorClass } from '../../src/core/errors.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { unmountAllUnder } from '../../src/core/sys/mounts.js';

async function tarBuf(files: Record<string, string>): Promise<Buffer> {
  const pack = tarStream.pack();
  for (const [name, body] of Object.entries(files)) pack.entry({ name, mode: 0o644 }, body);
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as unknown as AsyncIterable<Buffer>) chunks.push(c);
  return Buffer.concat(chunks);
}
const tarOf = (files: Record<string, string>): Readable => Readable.from((async function* () {
  yield await tarBuf(files);
})());

/** Every path under dir with its content (files) or '/' (dirs): what "unchanged" compares. */
async function snapshot(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of await fs.readdir(dir, { recursive: true, withFileTypes: true })) {
    const p = path.join(e.parentPath, e.name);
    out[path.relative(dir, p)] = e.isDirectory() ? '/' : e.isFile() ? await fs.readFile(p, 'utf8') : '?';
  }
  return out;
}

async function classOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return errorClass(err);
  }
  return 'ok';
}

let root: string;
beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-refuse-'));
});
afterEach(async () => {
  unmountAllUnder(root);
  await fs.rm(root, { recursive: true, force: true });
});

const layer = (id: string) => path.join(root, 'layers', id);

describe('refused layer-store calls change nothing', () => {
  it('a second ApplyDiff on an applied layer is refused and keeps its content', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    expect(await store.applyDiff('base', '', tarOf({ a: 'first', b: 'first-b' }))).toBeGreaterThan(0);
    const before = await snapshot(layer('base'));
    expect(await classOf(store.applyDiff('base', '', tarOf({ a: 'second' })))).toBe('FailedPrecondition');
    expect(await snapshot(layer('base'))).toEqual(before);
    expect(await fs.readFile(path.join(layer('base'), 'diff', 'a'), 'utf8')).toBe('first');
    // An empty second tar too.
    expect(await classOf(store.applyDiff('base', '', tarOf({})))).toBe('FailedPrecondition');
    expect(await snapshot(layer('base'))).toEqual(before);
  });

  it('the refusal names the rule and the remedy', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf({ a: '1' }));
    await expect(store.applyDiff('base', '', tarOf({ a: '2' }))).rejects.toThrow(/already has content.*applied once.*remove and re-create/);
  });

  it('ApplyDiff on a layer whose diff/ has files (written, never applied) is refused and keeps them', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf({ a: '1' }));
    await store.create('ctr', 'base', 'rw');
    const merged = await store.get('ctr');
    await fs.writeFile(path.join(merged, 'written'), 'by the container');
    await store.put('ctr');
    const before = await snapshot(layer('ctr'));
    expect(await classOf(store.applyDiff('ctr', 'base', tarOf({ x: 'y' })))).toBe('FailedPrecondition');
    expect(await snapshot(layer('ctr'))).toEqual(before);
    expect(await fs.readFile(path.join(layer('ctr'), 'diff', 'written'), 'utf8')).toBe('by the container');
  });

  it('ApplyDiff with the wrong parent is refused and changes nothing', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf({ a: '1' }));
    await store.create('top', 'base', 'ro');
    const before = await snapshot(layer('top'));
    expect(await classOf(store.applyDiff('top', '', tarOf({ x: 'y' })))).toBe('InvalidArgument');
    expect(await snapshot(layer('top'))).toEqual(before);
    expect(await store.applyDiff('top', 'base', tarOf({ x: 'y' }))).toBeGreaterThan(0); // still applicable
  });

  it('ApplyDiff on a mounted layer is refused and changes nothing', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf({ a: '1' }));
    await store.create('top', 'base', 'ro');
    await store.get('top');
    const before = await snapshot(path.join(layer('top'), 'diff'));
    expect(await classOf(store.applyDiff('top', 'base', tarOf({ x: 'y' })))).toBe('FailedPrecondition');
    expect(await snapshot(path.join(layer('top'), 'diff'))).toEqual(before);
    await store.put('top');
  });

  it('ApplyDiff of a removed layer is NotFound and creates nothing', async () => {
    const store = await openLayerStore({ root });
    expect(await classOf(store.applyDiff('gone', '', tarOf({ a: '1' })))).toBe('NotFound');
    expect(await fs.readdir(path.join(root, 'layers'))).toEqual([]);
  });

  it('a second Create of an existing layer is refused and keeps its content', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    await store.applyDiff('base', '', tarOf({ a: '1' }));
    const before = await snapshot(layer('base'));
    expect(await classOf(store.create('base', '', 'ro'))).toBe('AlreadyExists');
    expect(await snapshot(layer('base'))).toEqual(before);
  });

  it('a failed ApplyDiff (corrupt tar, input cut mid-way) leaves the layer empty and applicable', async () => {
    const store = await openLayerStore({ root });
    await store.create('base', '', 'ro');
    const good = await tarBuf({ a: 'x'.repeat(100_000), b: 'y' });
    const corrupt = Buffer.from(good);
    const bHeader = 512 + Math.ceil(100_000 / 512) * 512; // after a's header and data
    corrupt.fill(0x41, bHeader, bHeader + 100); // b's header: bad checksum
    expect(await classOf(store.applyDiff('base', '', Readable.from([corrupt])))).toBe('InvalidArgument');
    expect(await fs.readdir(path.join(layer('base'), 'diff'))).toEqual([]);

    const cut = new PassThrough();
    const p = classOf(store.applyDiff('base', '', cut));
    cut.write(good.subarray(0, 60_000));
    setTimeout(() => cut.destroy(new Error('client went away')), 50);
    expect(await p).not.toBe('ok');
    expect(await fs.readdir(path.join(layer('base'), 'diff'))).toEqual([]);
    expect(await fs.readdir(layer('base'))).not.toContain('applying');

    expect(await store.applyDiff('base', '', Readable.from([good]))).toBeGreaterThan(0);
    expect(await fs.readFile(path.join(layer('base'), 'diff', 'b'), 'utf8')).toBe('y');
  });
});
