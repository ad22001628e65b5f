/**
 * Racing calls on one layer, fired at the real `gear daemon` process over its
 * unix socket (real layer store, real overlay mounts; needs root and dist/):
 * Diff/Remove, ApplyDiff/Remove, Get/Put/Remove, Create/Remove,
 * Changes/Remove, DiffSize/Remove, each many times. Every call must end in a
 * success or a proper RPC error (`{"Err": …}`; for Diff also a non-200
 * reply, or a cut stream once the tar has started), and the daemon must stay
 * alive and leave no mount or half layer behind.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import tarStream from 'tar-stream';
import { Pool } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mountsUnder, unmountAllUnder } from '../../src/core/sys/mounts.js';
import { PLUGIN_MIME, startGearDaemon, type GearDaemon } from '../helpers/gear-daemon.js';

const ROUNDS = 24;
const BASE = 'b'.repeat(64);
const WIRE_ERR = /^(NotFound|AlreadyExists|InvalidArgument|FailedPrecondition|Unavailable|DeadlineExceeded|PermissionDenied|Unimplemented|Internal): ./;

let dir: string;
let daemon: GearDaemon;
let pool: Pool;

async function tarOf(files: Record<string, string>): Promise<Buffer> {
  const pack = tarStream.pack();
  for (const [name, body] of Object.entries(files)) pack.entry({ name, mode: 0o644 }, body);
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as unknown as AsyncIterable<Buffer>) chunks.push(c);
  return Buffer.concat(chunks);
}

/** A larger tar, so that a racing call lands while it streams (built in beforeAll). */
let BIG_TAR: Buffer;

type Outcome = { ok: true } | { ok: false; err: string } | { transport: string };

/** One JSON call; the outcome as dockerd would see it. */
async function call(method: string, args: unknown): Promise<Outcome> {
  try {
    const res = await pool.request({ method: 'POST', path: `/GraphDriver.${method}`, headers: { accept: PLUGIN_MIME }, body: JSON.stringify(args) });
    const text = await res.body.text();
    if (res.statusCode !== 200) return { transport: `HTTP ${res.statusCode}: ${text}` };
    const body = JSON.parse(text) as { Err?: string };
    return body.Err ? { ok: false, err: body.Err } : { ok: true };
  } catch (err) {
    return { transport: String(err) };
  }
}

async function applyDiff(id: string, tar: Buffer, parent = BASE): Promise<Outcome> {
  try {
    const res = await pool.request({
      method: 'POST',
      path: `/GraphDriver.ApplyDiff?id=${id}&parent=${parent}`,
      headers: { accept: PLUGIN_MIME },
      body: Readable.from([tar.subarray(0, tar.length >> 1), tar.subarray(tar.length >> 1)]),
    });
    const body = JSON.parse(await res.body.text()) as { Err?: string };
    return body.Err ? { ok: false, err: body.Err } : { ok: true };
  } catch (err) {
    return { transport: String(err) };
  }
}

/** Diff: a tar on 200 (read to the end, or cut once started), `{"Err"}` on non-200. */
async function diff(id: string): Promise<Outcome | { cut: true }> {
  let res;
  try {
    res = await pool.request({ method: 'POST', path: '/GraphDriver.Diff', headers: { accept: PLUGIN_MIME }, body: JSON.stringify({ ID: id, Parent: BASE }) });
  } catch (err) {
    return { transport: String(err) };
  }
  if (res.statusCode === 200) {
    try {
      await res.body.arrayBuffer();
      return { ok: true };
    } catch {
      return { cut: true }; // the protocol's mid-stream error: a truncated body, never a clean end
    }
  }
  try {
    const body = JSON.parse(await res.body.text()) as { Err?: string };
    return body.Err ? { ok: false, err: body.Err } : { transport: `HTTP ${res.statusCode} without Err` };
  } catch (err) {
    return { transport: `HTTP ${res.statusCode}: ${String(err)}` };
  }
}

function expectProper(o: Outcome | { cut: true }, what: string): void {
  if ('transport' in o) throw new Error(`${what}: no RPC reply: ${o.transport}\n--- daemon log ---\n${daemon.log()}`);
  if ('err' in o) expect(o.err, what).toMatch(WIRE_ERR);
}

async function freshLayer(id: string, content: boolean): Promise<void> {
  expect(await call('Create', { ID: id, Parent: BASE })).toEqual({ ok: true });
  if (content) expect(await applyDiff(id, await tarOf({ [`own-${id.slice(0, 6)}`]: 'hello' }))).toEqual({ ok: true });
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-races-'));
  daemon = await startGearDaemon({ dir });
  pool = new Pool('http://localhost', { socketPath: daemon.socket, connections: 8 });
  expect(await call('Create', { ID: BASE })).toEqual({ ok: true });
  expect(await applyDiff(BASE, await tarOf({ base: 'base' }), '')).toEqual({ ok: true });
  BIG_TAR = await tarOf(Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`f${i}`, 'x'.repeat(4096)])));
  expect(BIG_TAR.length).toBeGreaterThan(200 * 4096);
});

afterAll(async () => {
  await pool?.close().catch(() => undefined);
  await daemon?.stop();
  unmountAllUnder(dir);
  await fs.rm(dir, { recursive: true, force: true });
});

const id = (race: string, i: number) => `${race}${i}`.padEnd(64, '0');

/** Runs a, and b after a delay that varies with the round (0-5 ms; odd rounds start b first). */
async function race<A, B>(i: number, a: () => Promise<A>, b: () => Promise<B>): Promise<[A, B]> {
  const later = <T>(f: () => Promise<T>) => new Promise<void>((r) => setTimeout(r, i % 6)).then(f);
  if (i % 2) {
    const pb = b();
    return [await later(a), await pb];
  }
  return Promise.all([a(), later(b)]);
}

describe('racing calls on one layer against the gear daemon', () => {
  it('Diff racing Remove', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      const L = id('d1', i);
      await freshLayer(L, true);
      const [d, r] = await race(i, () => diff(L), () => call('Remove', { ID: L }));
      expectProper(d, `Diff round ${i}`);
      expectProper(r, `Remove round ${i}`);
      expect(daemon.alive(), daemon.log()).toBe(true);
    }
  });

  it('ApplyDiff racing Remove', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      const L = id('a1', i);
      await freshLayer(L, false);
      const [a, r] = await race(i, () => applyDiff(L, BIG_TAR), () => call('Remove', { ID: L }));
      expectProper(a, `ApplyDiff round ${i}`);
      expectProper(r, `Remove round ${i}`);
      // Remove won in the end (cancelling the upload or running after it): no half layer is left.
      expect(r, `Remove round ${i}`).toEqual({ ok: true });
      expect(await fs.readdir(path.join(daemon.root, 'layers'))).not.toContain(L);
    }
  });

  it('Get, Put and Remove racing', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      const L = id('g1', i);
      await freshLayer(L, true);
      const outs = await Promise.all([call('Get', { ID: L }), call('Put', { ID: L }), call('Remove', { ID: L }), call('Get', { ID: L })]);
      outs.forEach((o, k) => expectProper(o, `call ${k} round ${i}`));
    }
  });

  it('Create racing Remove', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      const L = id('c1', i);
      const outs = await Promise.all([call('Create', { ID: L, Parent: BASE }), call('Remove', { ID: L }), call('Create', { ID: L, Parent: BASE })]);
      outs.forEach((o, k) => expectProper(o, `call ${k} round ${i}`));
      expect(outs.filter((o) => 'ok' in o && o.ok).length).toBeGreaterThan(0);
    }
  });

  it('Changes racing Remove', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      const L = id('h1', i);
      await freshLayer(L, true);
      const [c, r] = await race(i, () => call('Changes', { ID: L, Parent: BASE }), () => call('Remove', { ID: L }));
      expectProper(c, `Changes round ${i}`);
      expectProper(r, `Remove round ${i}`);
    }
  });

  it('DiffSize racing Remove', async () => {
    for (let i = 0; i < ROUNDS; i++) {
      const L = id('s1', i);
      await freshLayer(L, true);
      const [c, r] = await race(i, () => call('DiffSize', { ID: L, Parent: BASE }), () => call('Remove', { ID: L }));
      expectProper(c, `DiffSize round ${i}`);
      expectProper(r, `Remove round ${i}`);
    }
  });

  it('afterwards: the daemon is alive, serves, and nothing of the removed layers is left', async () => {
    expect(daemon.alive(), daemon.log()).toBe(true);
    expect(await call('Status', {})).toEqual({ ok: true });
    for (const race of ['d1', 'a1', 'g1', 'c1', 'h1', 's1']) {
      for (let i = 0; i < ROUNDS; i++) await call('Remove', { ID: id(race, i) });
    }
    const left = (await fs.readdir(path.join(daemon.root, 'layers'))).filter((n) => n !== BASE);
    expect(left).toEqual([]);
    expect(mountsUnder(daemon.root).map((m) => m.mountPoint)).toEqual([]);
    expect(daemon.log()).not.toMatch(/uncaught|unhandled/i);
  });
});
