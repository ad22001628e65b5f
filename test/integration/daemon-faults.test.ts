/**
 * Fault scenarios of the "Done when", against a real `gear daemon`
 * driven over its graph-driver socket (no dockerd), a real registry and real
 * FUSE:
 *
 * - kill -9 mid-pull, 20 times at varied moments (ordinary and index layers),
 *   each followed by a restart: no half layer visible, no complete layer lost,
 *   the pool holds only verified files, and the pull then succeeds;
 * - kill -9 mid-read (a lazy fetch through the miss filesystem), 20 times:
 *   the reader gets an error instead of hanging, the restarted daemon's pool
 *   holds only verified files, and the read then returns the right bytes;
 * - disk full (the root on a small tmpfs) during a pull and during a fetch:
 *   a clear error naming ENOSPC, nothing corrupt in the pool, the daemon
 *   keeps running, and it works again once space is freed.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join, relative } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { gearDaemonAvailable } from '../helpers/dockerd.js';
import { blobPath, indexLayerTar, pushFiles, sha256hex } from '../helpers/gear-index.js';
import { startGearService, type GearService } from '../helpers/gear-service.js';
import { layerTar, type LayerEntry } from '../helpers/oci-images.js';
import { run, sleep, unmountUnder } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const REPO = 'gear-test/faults';
const ROUNDS = 20;

let available = false;
let reg: TestRegistry | undefined;
let proxy: FaultProxy | undefined;
let throttle = 0;
const services: GearService[] = [];

/** Files served lazily (below the 8 MiB streaming threshold: each is verified whole before it is visible). */
const lazyFiles: Record<string, Buffer> = {};
for (let i = 0; i < ROUNDS; i++) lazyFiles[`big/f${i}`] = randomBytes(400_000 + ((i * 7919) % 11) * 150_000);
const bigFile = { 'huge/file': randomBytes(6 << 20) };

beforeAll(async () => {
  available = await gearDaemonAvailable();
  if (!available) return;
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url, (req) =>
    throttle > 0 && req.url?.includes('/blobs/sha256:') ? { kind: 'throttle', bytesPerSecond: throttle } : undefined,
  );
  await pushFiles(reg.host, REPO, { ...lazyFiles, ...bigFile });
}, 120_000);

afterEach(async () => {
  throttle = 0;
  for (const s of services.splice(0)) await s.dispose();
});

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
});

// ---------------------------------------------------------------------------

/** Every file of the pool is complete and verified (its name is its sha256), and no staging file is left. */
function expectPoolVerified(root: string): number {
  const pool = join(root, 'pool');
  let n = 0;
  const shaDir = join(pool, 'sha256');
  if (existsSync(shaDir)) {
    for (const pre of readdirSync(shaDir)) {
      for (const name of readdirSync(join(shaDir, pre))) {
        const got = createHash('sha256').update(readFileSync(join(shaDir, pre, name))).digest('hex');
        expect(got, `pool file ${pre}/${name}`).toBe(name);
        expect(name.startsWith(pre)).toBe(true);
        n++;
      }
    }
  }
  const staging = join(pool, '.staging');
  if (existsSync(staging)) expect(readdirSync(staging), 'staging files left after open').toEqual([]);
  return n;
}

/** ApplyDiff with the tar sent in slices (so that a kill lands mid-body as well as mid-extraction). */
const SLICE = 64 << 10;

function applyDiffSlowly(socket: string, id: string, tar: Buffer, onSlice: (sent: number) => void): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, path: `/GraphDriver.ApplyDiff?id=${id}&parent=`, method: 'POST', timeout: 60_000 }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => {
        try {
          resolve(JSON.parse(body) as Record<string, unknown>);
        } catch {
          reject(new Error(`not JSON: ${body.slice(0, 200)}`));
        }
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    let off = 0;
    let sent = 0;
    const next = () => {
      if (req.destroyed) return;
      if (off >= tar.length) return void req.end();
      const part = tar.subarray(off, off + SLICE);
      off += part.length;
      const more = req.write(part);
      onSlice(++sent);
      if (more) setTimeout(next, 3);
      else req.once('drain', () => setTimeout(next, 3));
    };
    next();
  });
}

/** The regular files under dir (relative path → content), ignoring the index form's .gear/. */
function treeOf(dir: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) out.set(relative(dir, p), readFileSync(p));
    }
  };
  walk(dir);
  return out;
}

async function layerContent(g: GearService, id: string): Promise<Map<string, Buffer>> {
  const r = await g.call('Get', { ID: id });
  expect(r.Err, `Get ${id}`).toBeUndefined();
  try {
    return treeOf(String(r.Dir));
  } finally {
    await g.call('Put', { ID: id });
  }
}

function expectTree(got: Map<string, Buffer>, want: LayerEntry[], what: string) {
  const files = want.filter((e) => (e.type ?? 'file') === 'file');
  expect([...got.keys()].sort(), what).toEqual(files.map((e) => e.path).sort());
  for (const e of files) expect(sha256hex(got.get(e.path)!), `${what}: ${e.path}`).toBe(sha256hex(Buffer.from(e.content!)));
}

/** A reader of a miss filesystem path in a child process; resolves its exit code and stderr. */
function readerChild(file: string): Promise<{ code: number | null; stderr: string }> {
  const child = spawn('cat', [file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  return new Promise((resolve) =>
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    }),
  );
}

// ---------------------------------------------------------------------------

describe('kill -9 and restart', () => {
  it(`mid-pull, ${ROUNDS} times: no half layer visible, no complete layer lost, only verified pool files, the pull then succeeds`, async (ctx) => {
    if (!available) return ctx.skip();
    const g = await startGearService({ kind: 'daemon' });
    services.push(g);
    const complete = new Map<string, LayerEntry[]>();
    let killedMidway = 0;
    for (let i = 0; i < ROUNDS; i++) {
      const id = `pull${i}`;
      const index = i % 4 === 3; // every 4th pull is a Gear index layer
      let entries: LayerEntry[];
      let tar: Buffer;
      if (index) {
        const part = Object.fromEntries(Object.entries(lazyFiles).slice(i % 5, (i % 5) + 3));
        tar = await indexLayerTar(proxy!.host, REPO, part);
        entries = [];
      } else {
        entries = [
          { path: `d${i}`, type: 'dir' },
          ...Array.from({ length: 12 }, (_, j) => ({ path: `d${i}/f${j}`, content: randomBytes(40_000 + j * 9_000) })),
        ];
        tar = await layerTar(entries);
      }
      expect((await g.call('Create', { ID: id, Parent: '' })).Err).toBeUndefined();
      let answered = false;
      // Varied moments: after slice k of the body (mid-upload), or 0-60 ms after the whole body was sent
      // (mid-extraction, mid-commit, after the reply).
      const slices = Math.ceil(tar.length / SLICE);
      const target = (i * 7) % (slices + 4);
      let kill: Promise<void> | undefined;
      const pulling = applyDiffSlowly(g.socket, id, tar, (sent) => {
        if (kill || sent < Math.min(target + 1, slices)) return;
        kill = target < slices ? g.kill9() : sleep((target - slices) * 20).then(() => g.kill9());
      }).then(
        (r) => {
          answered = r.Err === undefined;
          return r;
        },
        () => undefined,
      );
      await pulling;
      await kill;
      if (!answered) killedMidway++;
      await g.start();

      // Every layer completed before is still there, whole (checked in full below, every 5 rounds here).
      for (const done of complete.keys()) expect((await g.call('Exists', { ID: done })).Exists, `lost layer ${done}`).toBe(true);
      const exists = (await g.call('Exists', { ID: id })).Exists === true;
      if (answered) expect(exists, `${id} was applied but is gone`).toBe(true);
      if (exists && !index) {
        // Visible means whole: all of it, or (killed between Create and ApplyDiff) none of it.
        const got = await layerContent(g, id);
        if (got.size > 0 || answered) expectTree(got, entries, `${id} after the restart`);
      }
      expectPoolVerified(g.root);
      // The pull again (as dockerd would: remove what is left, create, apply): correct bytes.
      if (exists) expect((await g.call('Remove', { ID: id })).Err).toBeUndefined();
      expect((await g.call('Create', { ID: id, Parent: '' })).Err).toBeUndefined();
      expect((await g.applyDiff(id, '', tar)).Err).toBeUndefined();
      if (!index) expectTree(await layerContent(g, id), entries, `${id} pulled again`);
      complete.set(id, entries);
      if (i % 5 === 4) {
        for (const [done, want] of complete) if (want.length > 0) expectTree(await layerContent(g, done), want, done);
      }
    }
    // The kills did land mid-pull (not only after the replies).
    expect(killedMidway).toBeGreaterThanOrEqual(ROUNDS / 2);
    for (const [done, want] of complete) if (want.length > 0) expectTree(await layerContent(g, done), want, done);
  }, 300_000);

  it(`mid-read, ${ROUNDS} times: readers get an error, only verified pool files, the read then returns the right bytes`, async (ctx) => {
    if (!available) return ctx.skip();
    const g = await startGearService({ kind: 'daemon', args: ['--fetch-timeout', '20s'] });
    services.push(g);
    expect((await g.call('Create', { ID: 'lazy', Parent: '' })).Err).toBeUndefined();
    expect((await g.applyDiff('lazy', '', await indexLayerTar(proxy!.host, REPO, lazyFiles))).Err).toBeUndefined();
    const miss = join(g.root, 'miss');
    const names = Object.keys(lazyFiles);
    let failedReads = 0;
    throttle = 4 << 20; // 4 MiB/s: a fetch takes 100-400 ms
    for (let i = 0; i < ROUNDS; i++) {
      const content = lazyFiles[names[i]!]!;
      const reading = readerChild(blobPath(miss, content));
      await sleep(((i * 53) % 31) * 10);
      await g.kill9();
      const r = await Promise.race([reading, sleep(10_000).then(() => undefined)]);
      expect(r, `round ${i}: the reader hung after the daemon was killed`).toBeDefined();
      if (r!.code !== 0) {
        failedReads++;
        expect(r!.stderr).toMatch(/Software caused connection abort|Transport endpoint is not connected|Input\/output error/);
      }
      await g.start();
      expect((await g.call('Exists', { ID: 'lazy' })).Exists).toBe(true); // the store is open again
      expectPoolVerified(g.root);
      const got = await readFile(blobPath(miss, content));
      expect(sha256hex(got), `round ${i}: read after the restart`).toBe(sha256hex(content));
    }
    expect(failedReads, 'too few kills landed mid-read').toBeGreaterThanOrEqual(ROUNDS / 4);
    throttle = 0;
    // Everything read before the kills is still right.
    for (const n of names) expect(sha256hex(await readFile(blobPath(miss, lazyFiles[n]!))), n).toBe(sha256hex(lazyFiles[n]!));
    expect(expectPoolVerified(g.root)).toBeGreaterThanOrEqual(ROUNDS);
  }, 300_000);
});

describe('disk full', () => {
  let mnt: string | undefined;
  afterEach(async () => {
    for (const s of services.splice(0)) await s.dispose(); // before its root goes
    if (!mnt) return;
    await unmountUnder(mnt);
    rmSync(mnt, { recursive: true, force: true });
    mnt = undefined;
  });

  async function smallRoot(sizeMiB: number): Promise<string> {
    mnt = mkdtempSync('/tmp/gear-full-');
    const r = await run('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0755`, 'tmpfs', mnt]);
    expect(r.code, r.stderr).toBe(0);
    const root = join(mnt, 'root');
    mkdirSync(root);
    return root;
  }

  it('during a pull: the error names ENOSPC, the daemon keeps running, the pull works once space is freed', async (ctx) => {
    if (!available) return ctx.skip();
    const root = await smallRoot(48);
    const g = await startGearService({ kind: 'daemon', root });
    services.push(g);
    const filler = join(root, '..', 'filler');
    writeFileSync(filler, Buffer.alloc(30 << 20));
    const entries: LayerEntry[] = [
      { path: 'big', type: 'dir' },
      ...Array.from({ length: 10 }, (_, j) => ({ path: `big/f${j}`, content: randomBytes(2 << 20) })),
    ];
    const tar = await layerTar(entries);
    expect((await g.call('Create', { ID: 'full', Parent: '' })).Err).toBeUndefined();
    const r = await g.applyDiff('full', '', tar);
    expect(String(r.Err), 'ApplyDiff on a full disk').toMatch(/^Unavailable: .*ENOSPC/);
    expect(String(r.Err), 'the remedy').toMatch(/free space on it/);
    // Still serving; nothing half-applied is visible; the pool is clean.
    expect((await g.call('Status')).Err).toBeUndefined();
    expect(g.pid()).toBeDefined();
    const exists = (await g.call('Exists', { ID: 'full' })).Exists === true;
    if (exists) expect((await layerContent(g, 'full')).size, 'a half layer is visible').toBe(0);
    expectPoolVerified(g.root);
    // Space freed: the same pull (dockerd removes the failed layer first) succeeds.
    rmSync(filler);
    if (exists) expect((await g.call('Remove', { ID: 'full' })).Err).toBeUndefined();
    expect((await g.call('Create', { ID: 'full', Parent: '' })).Err).toBeUndefined();
    expect((await g.applyDiff('full', '', tar)).Err).toBeUndefined();
    expectTree(await layerContent(g, 'full'), entries, 'full after space was freed');
  }, 120_000);

  it('during a fetch: the reader gets EIO, the log names ENOSPC and the remedy, the pool stays clean, reads work once space is freed', async (ctx) => {
    if (!available) return ctx.skip();
    const root = await smallRoot(24);
    const g = await startGearService({ kind: 'daemon', root, args: ['--fetch-timeout', '20s'] });
    services.push(g);
    expect((await g.call('Create', { ID: 'lazy', Parent: '' })).Err).toBeUndefined();
    expect((await g.applyDiff('lazy', '', await indexLayerTar(proxy!.host, REPO, bigFile))).Err).toBeUndefined();
    const filler = join(root, '..', 'filler');
    writeFileSync(filler, Buffer.alloc(20 << 20));
    const content = bigFile['huge/file'];
    const file = blobPath(join(root, 'miss'), content);
    const r = await readerChild(file);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/Input\/output error|No space left/);
    expect(g.pid(), 'the daemon died').toBeDefined();
    // The log says why the reader got EIO, and what to do.
    expect(g.logTail(200)).toMatch(/missfs: lookup failed/);
    expect(g.logTail(200)).toMatch(/ENOSPC: no space left on device.*free space on the filesystem holding the pool/s);
    expectPoolVerified(root);
    expect(existsSync(blobPath(join(root, 'pool'), content))).toBe(false);
    rmSync(filler);
    const got = await readFile(file);
    expect(sha256hex(got)).toBe(sha256hex(content));
    expectPoolVerified(root);
    // And it still stops cleanly (closing the registry client hung on the request the failed write abandoned).
    process.kill(g.pid()!, 'SIGTERM');
    expect(await g.waitExit(15_000), `no orderly exit within 15 s\n${g.logTail(10)}`).toEqual({ code: 0, signal: null });
  }, 120_000);
});
