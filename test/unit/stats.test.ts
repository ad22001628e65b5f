/**
 * The pieces of `gear stats` and the non-Gear container watch: the control
 * endpoint (mode, bounds, long root paths), attribution of a FUSE caller to a
 * container layer from mountinfo, the report's arithmetic, the unpack/container
 * split of containerd keys, and GEAR_REQUIRE_LAZY parsing.
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { Readable } from 'node:stream';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { cacheVerify } from '../../src/cli/cache.js';
import { requireLazyFrom } from '../../src/cli/lazy-options.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { controlCall, controlGet } from '../../src/core/control/client.js';
import { openLayerStore } from '../../src/core/layers/store.js';
import { serveControl } from '../../src/core/control/server.js';
import { MAX_SOCKET_PATH, socketPathIn } from '../../src/core/control/socket-path.js';
import { rootLayerOf, upperLayerOf } from '../../src/core/stats/callers.js';
import { NonLazyContainers, parseRequireLazy } from '../../src/core/stats/nonlazy.js';
import { buildStatsReport, type StatsLayer } from '../../src/core/stats/report.js';
import { UsageTracker } from '../../src/core/stats/usage.js';
import { clientKey, isImageUnpack } from '../../src/frontends/snapshotter/containers.js';

const dirs: string[] = [];
const tmp = () => {
  const d = mkdtempSync('/tmp/gear-stats-unit-');
  dirs.push(d);
  return d;
};
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** Raw HTTP over the socket, for requests the client would never send. */
function raw(sock: string, text: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(sock);
    let out = '';
    s.on('data', (d) => (out += d.toString()));
    s.on('end', () => resolve(out));
    s.on('close', () => resolve(out));
    s.on('error', reject);
    s.end(text);
  });
}

describe('control endpoint', () => {
  it('serves GET routes as JSON on ROOT/gear-control.sock, mode 0600, and removes it on close', async () => {
    const root = tmp();
    const srv = await serveControl(root, { '/v1/ping': () => ({ ok: true }), '/v1/fail': () => Promise.reject(new Error('boom')) });
    try {
      expect(srv.socket).toBe(join(root, 'gear-control.sock'));
      expect(statSync(srv.socket).mode & 0o777).toBe(0o600);
      expect(await controlGet(root, '/v1/ping')).toEqual({ ok: true });
      await expect(controlGet(root, '/v1/nope')).rejects.toThrow(/404.*no such endpoint/);
      await expect(controlGet(root, '/v1/fail')).rejects.toThrow(/500.*boom/);
      // Bounded: no body, no other method, no huge headers.
      expect(await raw(srv.socket, 'POST /v1/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello')).toMatch(/^HTTP\/1.1 405/);
      expect(await raw(srv.socket, 'GET /v1/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello')).toMatch(/^HTTP\/1.1 413/);
      expect(await raw(srv.socket, `GET /v1/ping HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`)).toMatch(/^HTTP\/1.1 431/);
    } finally {
      await srv.close();
    }
    expect(() => statSync(join(root, 'gear-control.sock'))).toThrow();
    await expect(controlGet(root, '/v1/ping')).rejects.toThrow(/no Gear daemon is serving/);
  });

  it('works in a root whose socket path exceeds the 107 bytes of sun_path (the managed plugin seen from the host)', async () => {
    let root = tmp();
    while (join(root, 'gear-control.sock').length <= MAX_SOCKET_PATH + 20) root = join(root, 'propagated-mount-0123456789');
    mkdirSync(root, { recursive: true });
    const p = socketPathIn(root);
    expect(p.path).toMatch(/^\/proc\/self\/fd\/\d+\/gear-control\.sock$/);
    p.release();
    const srv = await serveControl(root, { '/v1/ping': () => ({ ok: 'long' }) });
    try {
      expect(srv.socket.length).toBeGreaterThan(MAX_SOCKET_PATH);
      expect(statSync(srv.socket).mode & 0o777).toBe(0o600);
      expect(await controlGet(root, '/v1/ping')).toEqual({ ok: 'long' });
    } finally {
      await srv.close();
    }
    expect(() => statSync(join(root, 'gear-control.sock'))).toThrow();
  });

  it('replaces a socket a killed daemon left behind', async () => {
    const root = tmp();
    writeFileSync(join(root, '.gear-control-0badc0de.sock'), ''); // killed between bind and rename
    const first = await serveControl(root, { '/v1/ping': () => ({ n: 1 }) });
    // Not closed (as after kill -9): the next start takes the name over.
    const second = await serveControl(root, { '/v1/ping': () => ({ n: 2 }) });
    try {
      expect(readdirSync(root)).toEqual(['gear-control.sock']);
      expect(await controlGet(root, '/v1/ping')).toEqual({ n: 2 });
      // The old one closing later leaves the new one's socket alone.
      await first.close();
      expect(await controlGet(root, '/v1/ping')).toEqual({ n: 2 });
    } finally {
      await second.close();
    }
  });
});

describe('gear cache verify through the control socket', () => {
  it('scrubs in the daemon holding the pool, with progress, and refuses a bad rate', async () => {
    const root = tmp();
    const store = await openLayerStore({ root, lazy: { mountMissFs: false, scrubInterval: 0 } });
    try {
      const pool = store.lazyRuntime!.pool;
      const good = randomBytes(300_000);
      const bad = randomBytes(200_000);
      for (const b of [good, bad]) await pool.addFromStream(Readable.from([b]), `sha256:${createHash('sha256').update(b).digest('hex')}`, b.length);
      const badDigest = `sha256:${createHash('sha256').update(bad).digest('hex')}`;
      await writeFile(pool.path(badDigest), randomBytes(bad.length));
      const progress: number[] = [];
      const r = await cacheVerify({ root, rate: 200_000, onProgress: (p) => progress.push(p.bytes) });
      expect(r.by).toBe('daemon');
      // The control socket's run (its ids start with ctl-), not the request file's.
      expect(r.id).toMatch(/^ctl-[0-9a-f]{12}$/);
      expect(r).toMatchObject({ bad: 1, removed: 1 });
      expect(progress.length).toBeGreaterThan(0);
      expect(pool.has(badDigest)).toBe(false);
      await expect(controlCall(root, '/v1/cache/verify', { rate: '-5' })).rejects.toThrow(/rate "-5": expected a positive whole number/);
      await expect(controlCall(root, '/v1/stats', {})).rejects.toThrow(/405/);
    } finally {
      await store.close?.();
    }
  });
});

describe('caller attribution', () => {
  const root = '/var/lib/gear';
  it('finds the container layer of the root overlay in mountinfo (relative and absolute upperdir)', () => {
    const info = [
      '100 90 0:50 / / rw,relatime - overlay overlay rw,lowerdir=l/AAA:l/BBB::pool::miss,upperdir=layers/abc123/diff,workdir=layers/abc123/work,metacopy=on',
      '101 100 0:51 / /proc rw - proc proc rw',
    ].join('\n');
    expect(rootLayerOf(info, root)).toBe('abc123');
    expect(upperLayerOf('rw,lowerdir=/x,upperdir=/var/lib/gear/layers/f00d/diff,workdir=/w', root)).toBe('f00d');
    // Another store's container, a non-overlay root, an odd upperdir: not ours.
    expect(upperLayerOf('upperdir=/other/layers/f00d/diff', root)).toBeUndefined();
    expect(upperLayerOf('upperdir=layers/f00d/diff/../../x/diff', root)).toBeUndefined();
    expect(rootLayerOf('1 0 8:1 / / rw - ext4 /dev/sda1 rw', root)).toBeUndefined();
  });

  it('attributes needs to the container the resolver names', async () => {
    const u = new UsageTracker({ resolveCaller: async (pid) => (pid === 42 ? 'ctr1' : undefined) });
    u.noteCaller('sha256:aa', 42);
    u.noteNeed('sha256:aa', false);
    u.noteCaller('sha256:bb', 7);
    u.noteNeed('sha256:bb', false);
    u.noteNeed('sha256:cc', true); // no caller known
    await new Promise((r) => setImmediate(r));
    expect([...u.containers.get('ctr1')!.misses]).toEqual(['sha256:aa']);
    expect(u.containers.size).toBe(1);
    expect([...u.misses].sort()).toEqual(['sha256:aa', 'sha256:bb']);
    expect([...u.hits]).toEqual(['sha256:cc']);
  });
});

describe('stats report', () => {
  it('counts per index layer (shared files in each) and per container, and leaves out non-container layers', () => {
    const u = new UsageTracker();
    u.noteFetch('ok', 100, 'sha256:a');
    u.noteFetch('ok', 50, 'sha256:s');
    u.noteFetch('deadline', 0, 'sha256:b');
    u.noteNeed('sha256:a', false);
    u.noteNeed('sha256:s', true);
    u.containers.set('c1', { misses: new Set(['sha256:a']), hits: new Set() });
    const layers: StatsLayer[] = [
      { id: 'idx1', parent: '', kind: 'ro', gear: { files: 4, bytes: 400, location: { registry: 'r:5000', repository: 'x' }, blobs: [['sha256:a', 100], ['sha256:b', 200], ['sha256:s', 50]] } },
      { id: 'idx2', parent: '', kind: 'ro', gear: { files: 1, bytes: 50, blobs: [['sha256:s', 50]] } },
      { id: 'c1-init', parent: 'idx1', kind: 'rw' },
      { id: 'c1', parent: 'c1-init', kind: 'rw' },
      { id: 'plain', parent: '', kind: 'ro' },
      { id: 'plainctr', parent: 'plain', kind: 'rw' },
    ];
    const inPool = new Set(['sha256:a', 'sha256:s']);
    const r = buildStatsReport({
      root: '/r',
      since: 1,
      layers,
      pool: { has: (d) => inPool.has(d), stat: () => ({ files: 2, bytes: 150 }) },
      usage: u,
      prefetch: (l) => (l === 'idx1' ? { listed: 2, cached: 1, fetched: 1, failed: 0, skipped: 0, running: false } : undefined),
      nonLazy: new NonLazyContainers({}).state(),
    });
    const [l1, l2] = r.layers;
    expect(l1).toMatchObject({
      id: 'idx1',
      location: 'r:5000/x',
      listed: { files: 4, bytes: 400 },
      total: { files: 3, bytes: 350 },
      inPool: { files: 2, bytes: 150 },
      fromRegistry: { files: 2, bytes: 150 },
      neededFromRegistry: { files: 1, bytes: 100 },
      neededFromPool: { files: 1, bytes: 50 },
      prefetch: { state: 'done', listed: 2, cached: 1, fetched: 1 },
      containers: 1,
    });
    expect(l2).toMatchObject({ id: 'idx2', total: { files: 1, bytes: 50 }, fromRegistry: { files: 1, bytes: 50 }, prefetch: { state: 'none' }, containers: 0 });
    expect(r.containers).toEqual([{ id: 'c1', indexLayer: 'idx1', fromRegistry: { files: 1, bytes: 100 }, fromPool: { files: 0, bytes: 0 } }]);
    expect(r.totals).toMatchObject({ fromRegistry: { files: 2, bytes: 150 }, fetchFailures: 1, pool: { files: 2, bytes: 150 } });
    // The snapshotter names its containers (and says which layers are ones).
    const named = buildStatsReport({ root: '/r', since: 1, layers, usage: u, nonLazy: new NonLazyContainers({}).state(), containers: new Map([['c1', 'my-task']]) });
    expect(named.containers.map((c) => [c.id, c.name])).toEqual([['c1', 'my-task']]);
    expect(named.lazy).toBe(false);
  });
});

describe('non-Gear containers', () => {
  it('warns and counts, or refuses with the remedy under --require-lazy', () => {
    const warn = new NonLazyContainers({});
    warn.admit({ id: 'c1', image: 'sha256:abc', layers: 1 }); // allowed: counted only once created
    expect(warn.state().started).toBe(0);
    warn.note({ id: 'c1', image: 'sha256:abc', layers: 1 });
    expect(warn.state()).toMatchObject({ requireLazy: false, started: 1, refused: 0, last: { id: 'c1', image: 'sha256:abc' } });
    expect(Object.fromEntries(warn.status())['Non-Gear Containers']).toMatch(/^1 started, 0 refused \(last: c1 on sha256:abc\)$/);
    const strict = new NonLazyContainers({ requireLazy: true });
    expect(() => strict.admit({ id: 'c2', image: 'sha256:def', layers: 3 })).toThrow(/refusing container c2 on image sha256:def \(3 layers.*not a Gear image.*--require-lazy.*gear convert/);
    expect(strict.state()).toMatchObject({ started: 0, refused: 1 });
  });

  it('takes --require-lazy or GEAR_REQUIRE_LAZY; a bad value fails the daemon\'s start naming it', () => {
    const saved = process.env.GEAR_REQUIRE_LAZY;
    try {
      delete process.env.GEAR_REQUIRE_LAZY;
      expect(requireLazyFrom({ lazy: true, insecureRegistry: [], fusePassthrough: true })).toBe(false);
      expect(requireLazyFrom({ lazy: true, insecureRegistry: [], fusePassthrough: true, requireLazy: true })).toBe(true);
      process.env.GEAR_REQUIRE_LAZY = 'true';
      expect(requireLazyFrom({ lazy: true, insecureRegistry: [], fusePassthrough: true })).toBe(true);
      process.env.GEAR_REQUIRE_LAZY = 'false';
      expect(requireLazyFrom({ lazy: true, insecureRegistry: [], fusePassthrough: true })).toBe(false);
    } finally {
      if (saved === undefined) delete process.env.GEAR_REQUIRE_LAZY;
      else process.env.GEAR_REQUIRE_LAZY = saved;
    }
    const dir = tmp();
    const r = spawnSync(process.execPath, [GEAR_CLI, 'daemon', '--socket', join(dir, 'g.sock'), '--root', join(dir, 'root')], {
      encoding: 'utf8',
      env: { ...process.env, GEAR_REQUIRE_LAZY: 'maybe' },
      timeout: 30_000,
    });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/GEAR_REQUIRE_LAZY="maybe": expected true or false/);
    expect(existsSync(join(dir, 'root'))).toBe(false);
  });

  it('parses GEAR_REQUIRE_LAZY and refuses values it does not know', () => {
    for (const v of ['1', 'true', 'YES', 'on']) expect(parseRequireLazy(v)).toBe(true);
    for (const v of [undefined, '', '0', 'false', 'no', 'off']) expect(parseRequireLazy(v)).toBe(false);
    expect(() => parseRequireLazy('maybe')).toThrow(/GEAR_REQUIRE_LAZY="maybe": expected true or false/);
  });

  it('tells containerd\'s unpack snapshots from containers', () => {
    expect(clientKey('default/12/extract-123-abc sha256:ff')).toEqual({ namespace: 'default', key: 'extract-123-abc sha256:ff' });
    expect(clientKey('plain-key')).toEqual({ key: 'plain-key' });
    expect(isImageUnpack('k8s.io/3/extract-1-x sha256:aa', {})).toBe(true);
    expect(isImageUnpack('extract-1-x sha256:aa', undefined)).toBe(true);
    expect(isImageUnpack('default/4/mycontainer', { 'containerd.io/snapshot.ref': 'sha256:aa' })).toBe(true);
    expect(isImageUnpack('default/4/mycontainer', {})).toBe(false);
    expect(isImageUnpack('default/4/my/extract-like', {})).toBe(false);
  });
});
