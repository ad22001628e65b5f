/**
 * The miss filesystem on real mounts (needs root, /dev/fuse, overlayfs with
 * data-only layers).
 *
 * Rule for every test here: the FUSE server runs on this process's main
 * thread, so this process never touches the mount itself — not with sync
 * calls (the main thread would wait on itself) and not through the libuv
 * threadpool (blocked pool threads could starve the provider). Every access
 * to a mount goes through a child process (cat, stat, ls, getfattr, mount).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { silentLogger } from '../../src/core/log.js';
import { mountMissFs, type MissFsMount } from '../../src/core/missfs/index.js';
import { InitFlag } from '../../src/core/missfs/protocol.js';
import { mountOverlay } from '../../src/core/sys/mounts.js';
import { setXattr } from '../../src/core/sys/xattr.js';
import { run, waitFor } from '../helpers/proc.js';
import { addBlob, DirProvider, type Blob } from './fixtures/missfs-provider.js';
import { metacopyOverlay } from './fixtures/missfs-overlay.js';

const canRun = process.getuid?.() === 0 && existsSync('/dev/fuse');

let tmp: string;
let blobs: string;
let provider: DirProvider;
/** Cleanup in reverse order: overlays first, then FUSE. */
const overlays: string[] = [];
const sessions: MissFsMount[] = [];
const children: ChildProcess[] = [];
const extraMounts: string[] = [];

function isMounted(mp: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === mp);
}

async function mountFs(
  mp = join(tmp, 'miss'),
  opts: { requestTimeoutMs?: number; passthrough?: boolean; passthroughLingerMs?: number } = {},
): Promise<MissFsMount> {
  const m = await mountMissFs({ mountpoint: mp, provider, logger: silentLogger(), ...opts });
  sessions.push(m);
  return m;
}

function blobPath(m: MissFsMount, b: Blob): string {
  return join(m.mountpoint, 'sha256', b.hex.slice(0, 2), b.hex);
}

/** Starts a child that reads a file; resolves with its stdout and exit code. */
function catChild(file: string): { child: ChildProcess; done: Promise<{ code: number | null; signal: string | null; out: Buffer; err: string }> } {
  const child = spawn('cat', [file], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const out: Buffer[] = [];
  let err = '';
  child.stdout!.on('data', (b: Buffer) => out.push(b));
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  const done = new Promise<{ code: number | null; signal: string | null; out: Buffer; err: string }>((resolve) => {
    child.on('close', (code, signal) => resolve({ code, signal, out: Buffer.concat(out), err }));
  });
  return { child, done };
}

async function catFile(file: string, timeoutMs = 20_000): Promise<{ code: number | null; out: Buffer; err: string }> {
  const { child, done } = catChild(file);
  const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
  const r = await done;
  clearTimeout(t);
  return r;
}

function sha(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

beforeEach(() => {
  tmp = mkdtempSync('/tmp/gmiss-');
  blobs = join(tmp, 'blobs');
  mkdirSync(blobs);
  provider = new DirProvider(blobs);
});

afterEach(async () => {
  for (const c of children.splice(0)) {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }
  for (const o of overlays.splice(0).reverse()) {
    await run('umount', ['-l', o], { timeoutMs: 10_000 });
  }
  for (const m of sessions.splice(0).reverse()) {
    try {
      await m.unmount({ timeoutMs: 5_000 });
    } catch {
      await run('umount', ['-l', m.mountpoint], { timeoutMs: 10_000 });
    }
  }
  for (const mp of extraMounts.splice(0)) {
    if (isMounted(mp)) await run('umount', ['-l', mp], { timeoutMs: 10_000 });
  }
  // Only remove the temp dir when nothing is mounted below it any more.
  const stillMounted = readFileSync('/proc/self/mountinfo', 'utf8').includes(tmp);
  if (!stillMounted) rmSync(tmp, { recursive: true, force: true });
});

describe.skipIf(!canRun)('miss filesystem (real FUSE mounts)', () => {
  it('mounts, negotiates INIT, and serves stat, cat, readdir, statfs and xattr queries', async () => {
    const a = addBlob(blobs, 'hello from the miss filesystem\n');
    const m = await mountFs();
    expect(m.init.major).toBe(7);
    expect(m.init.minor).toBeGreaterThanOrEqual(31);
    expect(isMounted(m.mountpoint)).toBe(true);

    const ls = await run('ls', ['-a', m.mountpoint], { timeoutMs: 10_000 });
    expect(ls.stdout.split('\n').filter(Boolean)).toEqual(['.', '..', 'sha256']);

    const st = await run('stat', ['-c', '%s %a %u %g %F %i', blobPath(m, a)], { timeoutMs: 10_000 });
    expect(st.code).toBe(0);
    const [size, mode, uid, gid, ...rest] = st.stdout.trim().split(' ');
    expect(Number(size)).toBe(a.data.length);
    expect(mode).toBe('444');
    expect(uid).toBe('0');
    expect(gid).toBe('0');
    expect(rest.slice(0, 2).join(' ')).toBe('regular file');
    const ino = rest[2];

    const c = await catFile(blobPath(m, a));
    expect(c.code).toBe(0);
    expect(c.out.equals(a.data)).toBe(true);
    // The name is cached by the kernel after the first LOOKUP: one provider lookup.
    expect(provider.lookupsOf(a.digest)).toBe(1);

    // Stable inode per digest.
    const st2 = await run('stat', ['-c', '%i', blobPath(m, a)], { timeoutMs: 10_000 });
    expect(st2.stdout.trim()).toBe(ino);

    // The listing shows what the kernel currently knows.
    const lsPre = await run('ls', [join(m.mountpoint, 'sha256')], { timeoutMs: 10_000 });
    expect(lsPre.stdout.split('\n')).toContain(a.hex.slice(0, 2));
    const lsFiles = await run('ls', [join(m.mountpoint, 'sha256', a.hex.slice(0, 2))], { timeoutMs: 10_000 });
    expect(lsFiles.stdout.split('\n')).toContain(a.hex);

    // xattrs: absent (ENODATA), never ENOSYS; the listing is empty.
    const gx = await run('getfattr', ['-n', 'trusted.overlay.metacopy', blobPath(m, a)], { timeoutMs: 10_000 });
    expect(gx.code).not.toBe(0);
    expect(gx.stderr).toMatch(/No such attribute/);
    const gu = await run('getfattr', ['-n', 'user.foo', m.mountpoint], { timeoutMs: 10_000 });
    expect(gu.stderr).toMatch(/No such attribute/);
    const lx = await run('getfattr', ['-d', '-m', '-', blobPath(m, a)], { timeoutMs: 10_000 });
    expect(lx.code).toBe(0);
    expect(lx.stdout.trim()).toBe('');

    const sf = await run('stat', ['-f', '-c', '%T %l', m.mountpoint], { timeoutMs: 10_000 });
    expect(sf.code).toBe(0);
    expect(sf.stdout.trim()).toMatch(/fuse/);
    expect(sf.stdout.trim().endsWith('255')).toBe(true);
    expect(m.stats().unsupported).toEqual({});
  });

  it('answers unknown digests and bad names with ENOENT, writes with EROFS', async () => {
    const m = await mountFs();
    const unknown = 'ab'.repeat(32);
    const r1 = await run('stat', [join(m.mountpoint, 'sha256', 'ab', unknown)], { timeoutMs: 10_000 });
    expect(r1.code).not.toBe(0);
    expect(r1.stderr).toMatch(/No such file/);
    expect(provider.lookupsOf(`sha256:${unknown}`)).toBe(1);
    // A digest under the wrong prefix, a bad prefix, a bad top-level name: no provider call.
    for (const p of [join('sha256', 'cd', unknown), join('sha256', 'xyz'), 'sha512', join('sha256', 'ab', 'short')]) {
      const r = await run('stat', [join(m.mountpoint, p)], { timeoutMs: 10_000 });
      expect(r.stderr).toMatch(/No such file/);
    }
    expect(provider.calls.length).toBe(1);
    const t = await run('touch', [join(m.mountpoint, 'x')], { timeoutMs: 10_000 });
    expect(t.stderr).toMatch(/Read-only file system/);
    const mk = await run('mkdir', [join(m.mountpoint, 'sha256', 'newdir')], { timeoutMs: 10_000 });
    expect(mk.stderr).toMatch(/Read-only file system/);
  });

  it('reads large files correctly (many READ requests, big reads)', async () => {
    const big = addBlob(blobs, randomBytes(5 * 1024 * 1024 + 123));
    // READ path: passthrough off by option.
    const m = await mountFs(undefined, { passthrough: false });
    expect(m.stats().passthrough).toBe(false);
    const c = await catFile(blobPath(m, big));
    expect(c.code).toBe(0);
    expect(c.out.length).toBe(big.data.length);
    expect(sha(c.out)).toBe(big.hex);
    // Ranged read in the middle (dd with skip) goes through the same path.
    const dd = await run('dd', [`if=${blobPath(m, big)}`, 'bs=4096', 'skip=100', 'count=3', 'status=none'], {
      timeoutMs: 10_000,
    });
    expect(dd.code).toBe(0);
    expect(Buffer.from(dd.stdout, 'latin1').length).toBeGreaterThan(0);
    expect(m.stats().bytesRead).toBeGreaterThanOrEqual(big.data.length);
    expect(m.stats().passthroughOpens).toBe(0);
    expect(m.stats().backingIds).toBe(0);
  });

  it('serves other files while one provider lookup is slow', async () => {
    const files = Array.from({ length: 16 }, (_, i) => addBlob(blobs, `file ${i} ` + 'x'.repeat(i * 1000)));
    const slow = files[0]!;
    provider.lookupDelay.set(slow.hex, 5_000);
    const m = await mountFs();
    const t0 = Date.now();
    const finished: Array<{ hex: string; at: number; ok: boolean }> = [];
    const slowRun = catChild(blobPath(m, slow));
    await provider.lookupStarted(slow.digest);
    const rest = files.slice(1).map(async (f) => {
      const r = await catFile(blobPath(m, f));
      finished.push({ hex: f.hex, at: Date.now() - t0, ok: r.code === 0 && r.out.equals(f.data) });
    });
    await Promise.all(rest);
    const slowR = await slowRun.done;
    const slowAt = Date.now() - t0;
    expect(slowR.code).toBe(0);
    expect(slowR.out.equals(slow.data)).toBe(true);
    expect(finished.every((f) => f.ok)).toBe(true);
    // Everything else finished well before the slow lookup did.
    expect(Math.max(...finished.map((f) => f.at))).toBeLessThan(4_000);
    expect(slowAt).toBeGreaterThanOrEqual(4_900);
  });

  it('concurrent lookups of one digest share one provider call', async () => {
    const a = addBlob(blobs, 'shared');
    provider.lookupDelay.set(a.hex, 1_000);
    const m = await mountFs();
    const rs = await Promise.all(Array.from({ length: 6 }, () => catFile(blobPath(m, a))));
    expect(rs.every((r) => r.code === 0 && r.out.equals(a.data))).toBe(true);
    expect(provider.lookupsOf(a.digest)).toBe(1);
  });

  it('a failed fetch gives EIO, is not cached, and a retry succeeds', async () => {
    const a = addBlob(blobs, 'flaky blob');
    provider.failLookups.set(a.hex, 1);
    const m = await mountFs();
    const r1 = await catFile(blobPath(m, a));
    expect(r1.code).not.toBe(0);
    expect(r1.err).toMatch(/Input\/output error/);
    const r2 = await catFile(blobPath(m, a));
    expect(r2.code).toBe(0);
    expect(r2.out.equals(a.data)).toBe(true);
    expect(provider.lookupsOf(a.digest)).toBe(2);
    expect(m.stats().lookupErrors).toBe(1);
  });

  it('a provider call that exceeds the request timeout gives EIO', async () => {
    const a = addBlob(blobs, 'too slow');
    provider.lookupDelay.set(a.hex, 30_000);
    const m = await mountFs(undefined, { requestTimeoutMs: 500 });
    const t0 = Date.now();
    const r = await catFile(blobPath(m, a));
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/Input\/output error/);
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(m.stats().timeouts).toBe(1);
    expect(provider.aborts).toContainEqual({ op: 'lookup', digest: a.digest });
  });

  it('overlay: a metacopy file with no pool copy is served through FUSE; with a pool copy FUSE is not used', async () => {
    const a = addBlob(blobs, 'content served through the miss filesystem\n'.repeat(1000));
    const b = addBlob(blobs, 'content that is in the pool\n');
    const m = await mountFs();
    const meta = join(tmp, 'meta');
    const pool = join(tmp, 'pool');
    const merged = join(tmp, 'merged');
    for (const d of [meta, pool, merged]) mkdirSync(d);
    const mkMeta = (name: string, blob: Blob) => {
      const f = join(meta, name);
      writeFileSync(f, '');
      truncateSync(f, blob.data.length); // sparse, real size
      setXattr(f, 'trusted.overlay.metacopy', Buffer.alloc(0));
      setXattr(f, 'trusted.overlay.redirect', `/sha256/${blob.hex.slice(0, 2)}/${blob.hex}`);
    };
    mkMeta('a.txt', a);
    mkMeta('b.txt', b);
    mkdirSync(join(pool, 'sha256', b.hex.slice(0, 2)), { recursive: true });
    writeFileSync(join(pool, 'sha256', b.hex.slice(0, 2), b.hex), b.data);

    // mount(8) in a child: overlay's mount itself queries the FUSE layer (statfs), which this thread serves.
    const mo = await run(
      'mount',
      ['-t', 'overlay', 'overlay', '-o', `ro,metacopy=on,redirect_dir=on,lowerdir=${meta}::${pool}::${m.mountpoint}`, merged],
      { timeoutMs: 20_000 },
    );
    expect(mo.stderr).toBe('');
    expect(mo.code).toBe(0);
    overlays.push(merged);

    // stat comes from the metacopy inode: no FUSE lookup.
    const st = await run('stat', ['-c', '%s', join(merged, 'a.txt')], { timeoutMs: 10_000 });
    expect(Number(st.stdout.trim())).toBe(a.data.length);
    expect(provider.calls).toEqual([]);

    const ra = await catFile(join(merged, 'a.txt'));
    expect(ra.code).toBe(0);
    expect(ra.out.equals(a.data)).toBe(true);
    expect(provider.lookupsOf(a.digest)).toBe(1);

    const rb = await catFile(join(merged, 'b.txt'));
    expect(rb.code).toBe(0);
    expect(rb.out.equals(b.data)).toBe(true);
    expect(provider.lookupsOf(b.digest)).toBe(0);
    expect(provider.calls.filter((c) => c.digest === b.digest)).toEqual([]);

    // Read again: served from cache, still exactly one lookup.
    const ra2 = await catFile(join(merged, 'a.txt'));
    expect(ra2.out.equals(a.data)).toBe(true);
    expect(provider.lookupsOf(a.digest)).toBe(1);
  });

  it('overlay: a failed fetch fails the open with EIO, and the next open succeeds', async () => {
    const a = addBlob(blobs, 'retry through overlay\n');
    provider.failLookups.set(a.hex, 1);
    const m = await mountFs();
    const meta = join(tmp, 'meta');
    const pool = join(tmp, 'pool');
    const merged = join(tmp, 'merged');
    for (const d of [meta, pool, merged]) mkdirSync(d);
    const f = join(meta, 'a.txt');
    writeFileSync(f, '');
    truncateSync(f, a.data.length);
    setXattr(f, 'trusted.overlay.metacopy', Buffer.alloc(0));
    setXattr(f, 'trusted.overlay.redirect', `/sha256/${a.hex.slice(0, 2)}/${a.hex}`);
    const mo = await run(
      'mount',
      ['-t', 'overlay', 'overlay', '-o', `ro,metacopy=on,redirect_dir=on,lowerdir=${meta}::${pool}::${m.mountpoint}`, merged],
      { timeoutMs: 20_000 },
    );
    expect(mo.code).toBe(0);
    overlays.push(merged);
    const r1 = await catFile(join(merged, 'a.txt'));
    expect(r1.code).not.toBe(0);
    const r2 = await catFile(join(merged, 'a.txt'));
    expect(r2.code).toBe(0);
    expect(r2.out.equals(a.data)).toBe(true);
    expect(provider.lookupsOf(a.digest)).toBe(2);
  });

  it('a killed reader interrupts its pending lookup; the server goes on', async () => {
    const a = addBlob(blobs, 'slow one');
    const b = addBlob(blobs, 'fast one');
    provider.lookupDelay.set(a.hex, 30_000);
    const m = await mountFs();
    const { child, done } = catChild(blobPath(m, a));
    await provider.lookupStarted(a.digest);
    const t0 = Date.now();
    child.kill('SIGKILL');
    const r = await done;
    expect(r.signal).toBe('SIGKILL');
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(await waitFor(() => provider.aborts.some((x) => x.digest === a.digest), 5_000, 20)).toBe(true);
    expect(m.stats().interrupts).toBeGreaterThanOrEqual(1);
    expect(m.stats().inflight).toBe(0);
    const rb = await catFile(blobPath(m, b));
    expect(rb.out.equals(b.data)).toBe(true);
  });

  it('unmount while a read is in flight completes in bounded time', async () => {
    const a = addBlob(blobs, randomBytes(256 * 1024));
    const m = await mountFs();
    // Make reads (not the lookup) slow; a partial file is served through READ even with passthrough.
    provider.readDelay.set(a.hex, 30_000);
    provider.partial.add(a.hex);
    const reader = catChild(blobPath(m, a));
    expect(await waitFor(() => m.stats().inflight > 0 && m.stats().reads > 0, 10_000, 20)).toBe(true);
    const t0 = Date.now();
    await m.unmount({ timeoutMs: 10_000 });
    expect(Date.now() - t0).toBeLessThan(5_000);
    await m.closed;
    expect(isMounted(m.mountpoint)).toBe(false);
    const r = await reader.done;
    expect(r.code).not.toBe(0);
    expect(provider.openFiles).toBe(0);
  });

  it('honours FORGET: nodes go away when the kernel drops them, inode numbers stay stable per digest', async () => {
    const files = Array.from({ length: 5 }, (_, i) => addBlob(blobs, `forget me ${i}`));
    const m = await mountFs();
    const inos: string[] = [];
    for (const f of files) {
      const r = await run('stat', ['-c', '%i', blobPath(m, f)], { timeoutMs: 10_000 });
      inos.push(r.stdout.trim());
    }
    expect(m.stats().liveNodes).toBe(5);
    // Reclaim dentries and inodes: the kernel sends FORGET / BATCH_FORGET for our nodes.
    writeFileSync('/proc/sys/vm/drop_caches', '2');
    expect(await waitFor(() => m.stats().liveNodes === 0, 10_000, 50)).toBe(true);
    expect(m.stats().forgets).toBeGreaterThanOrEqual(5);
    for (const [i, f] of files.entries()) {
      const r = await run('stat', ['-c', '%i', blobPath(m, f)], { timeoutMs: 10_000 });
      expect(r.stdout.trim()).toBe(inos[i]);
    }
    expect(provider.lookupsOf(files[0]!.digest)).toBe(2);
    expect(m.stats().liveNodes).toBe(5);
  });

  it('a handled, non-fatal signal does not fail the open or abort the fetch', async () => {
    const a = addBlob(blobs, 'worth waiting for');
    provider.lookupDelay.set(a.hex, 1_500);
    const m = await mountFs();
    const script = [
      'import signal, sys',
      'hits = []',
      'signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))',
      'data = open(sys.argv[1], "rb").read()',
      'sys.stdout.write("%d %d" % (len(data), len(hits)))',
    ].join('\n');
    const child = spawn(existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3', ['-c', script, blobPath(m, a)], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let out = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    const done = new Promise<number | null>((r) => child.on('close', r));
    await provider.lookupStarted(a.digest);
    await new Promise((r) => setTimeout(r, 200));
    child.kill('SIGUSR1');
    expect(await done).toBe(0);
    expect(out).toBe(`${a.data.length} 1`);
    expect(m.stats().interrupts).toBeGreaterThanOrEqual(1);
    expect(provider.aborts).toEqual([]);
    expect(provider.lookupsOf(a.digest)).toBe(1);
  });

  it('a reader killed during a slow READ dies at once; the file is released when the read ends', async () => {
    const a = addBlob(blobs, randomBytes(64 * 1024));
    const m = await mountFs();
    provider.readDelay.set(a.hex, 3_000);
    provider.partial.add(a.hex); // served through READ
    const { child, done } = catChild(blobPath(m, a));
    expect(await waitFor(() => m.stats().reads > 0 && m.stats().inflight > 0, 10_000, 20)).toBe(true);
    const t0 = Date.now();
    child.kill('SIGKILL');
    const r = await done;
    expect(r.signal).toBe('SIGKILL');
    // The reader waits killably (page lock, or INTERRUPT → EINTR), not for the provider.
    expect(Date.now() - t0).toBeLessThan(2_000);
    // Readahead READs are background requests the kernel does not interrupt: they finish,
    // then the kernel sends RELEASE and the provider file is closed.
    expect(await waitFor(() => provider.openFiles === 0, 15_000, 50)).toBe(true);
    provider.readDelay.delete(a.hex);
    const again = await catFile(blobPath(m, a));
    expect(again.code).toBe(0);
    expect(again.out.equals(a.data)).toBe(true);
  });

  it('unmount while an overlay still uses the mount aborts the connection after a bounded wait', async () => {
    const a = addBlob(blobs, 'held by overlay');
    const m = await mountFs();
    const meta = join(tmp, 'meta');
    const pool = join(tmp, 'pool');
    const merged = join(tmp, 'merged');
    for (const d of [meta, pool, merged]) mkdirSync(d);
    const f = join(meta, 'a.txt');
    writeFileSync(f, '');
    truncateSync(f, a.data.length);
    setXattr(f, 'trusted.overlay.metacopy', Buffer.alloc(0));
    setXattr(f, 'trusted.overlay.redirect', `/sha256/${a.hex.slice(0, 2)}/${a.hex}`);
    const mo = await run(
      'mount',
      ['-t', 'overlay', 'overlay', '-o', `ro,metacopy=on,redirect_dir=on,lowerdir=${meta}::${pool}::${m.mountpoint}`, merged],
      { timeoutMs: 20_000 },
    );
    expect(mo.code).toBe(0);
    overlays.push(merged);
    const t0 = Date.now();
    await m.unmount({ timeoutMs: 1_000 });
    expect(Date.now() - t0).toBeLessThan(8_000);
    await m.closed;
    expect(isMounted(m.mountpoint)).toBe(false);
    // The overlay is left with a dead data layer: opens fail, nothing hangs.
    const r = await catFile(join(merged, 'a.txt'), 10_000);
    expect(r.code).not.toBe(0);
  });

  it('a synchronous overlay mount(2) on this thread does not deadlock (the reader answers STATFS itself)', async () => {
    const a = addBlob(blobs, 'mounted synchronously');
    const m = await mountFs();
    const meta = join(tmp, 'meta');
    const pool = join(tmp, 'pool');
    const merged = join(tmp, 'merged');
    for (const d of [meta, pool, merged]) mkdirSync(d);
    const f = join(meta, 'a.txt');
    writeFileSync(f, '');
    truncateSync(f, a.data.length);
    setXattr(f, 'trusted.overlay.metacopy', Buffer.alloc(0));
    setXattr(f, 'trusted.overlay.redirect', `/sha256/${a.hex.slice(0, 2)}/${a.hex}`);
    // Safety net: should the main thread ever hang in mount(2), abort the connection so the test ends.
    expect(m.connection).toBeTypeOf('number');
    const watchdog = spawn('sh', ['-c', `sleep 15; echo 1 > /sys/fs/fuse/connections/${m.connection}/abort`], {
      stdio: 'ignore',
    });
    children.push(watchdog);
    const before = m.stats().staticReplies;
    try {
      mountOverlay(merged, { lowers: [meta], dataLowers: [pool, m.mountpoint], extra: ['ro', 'metacopy=on', 'redirect_dir=on'] });
      overlays.push(merged);
    } finally {
      watchdog.kill('SIGKILL');
    }
    expect(m.stats().staticReplies).toBeGreaterThan(before);
    const r = await catFile(join(merged, 'a.txt'));
    expect(r.code).toBe(0);
    expect(r.out.equals(a.data)).toBe(true);
  });

  it('replaces a stale mount left by a crashed daemon, and refuses a live one', async () => {
    const a = addBlob(blobs, 'after the crash');
    const mp = join(tmp, 'miss');
    mkdirSync(mp);
    // A "crashed daemon": a FUSE connection whose device fd is closed (reads of the mount give ENOTCONN).
    const fd = openSync('/dev/fuse', 'r+');
    const child = spawn('mount', ['-i', '-t', 'fuse.gear', '-o', 'fd=3,rootmode=40000,user_id=0,group_id=0,allow_other,ro', 'gear', mp], {
      stdio: ['ignore', 'ignore', 'pipe', fd],
    });
    const code = await new Promise<number | null>((r) => child.on('close', r));
    closeSync(fd);
    extraMounts.push(mp);
    expect(code).toBe(0);
    const probe = await run('stat', [mp], { timeoutMs: 5_000 });
    expect(probe.stderr).toMatch(/not connected/);

    const m = await mountFs(mp);
    const c = await catFile(blobPath(m, a));
    expect(c.out.equals(a.data)).toBe(true);

    // A second daemon on a live mount is refused.
    const err = await mountMissFs({ mountpoint: mp, provider, logger: silentLogger() }).catch((e: unknown) => e);
    expect(isClass(err, 'FailedPrecondition')).toBe(true);
    // …and the first one is still serving.
    const c2 = await catFile(blobPath(m, a));
    expect(c2.code).toBe(0);
  });
});

const PYTHON = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';

/**
 * A child that opens files and holds them open, stepping on each line written
 * to it: after start it has read the first `head` bytes of each file and says
 * "open"; after the first line it reads the rest and answers the sha256 of
 * each; after the second it closes them and says "closed".
 */
function holder(files: string[], head = 4096): { next: () => Promise<string>; step: () => Promise<string>; done: Promise<number | null> } {
  const script = [
    'import sys, hashlib',
    `head = ${head}`,
    'fs = [open(p, "rb") for p in sys.argv[1:]]',
    'heads = [f.read(head) for f in fs]',
    'print("open", flush=True)',
    'sys.stdin.readline()',
    'print(" ".join(hashlib.sha256(h + f.read()).hexdigest() for f, h in zip(fs, heads)), flush=True)',
    'sys.stdin.readline()',
    'for f in fs: f.close()',
    'print("closed", flush=True)',
  ].join('\n');
  const child = spawn(PYTHON, ['-c', script, ...files], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.push(child);
  const lines: string[] = [];
  const waiting: Array<(l: string) => void> = [];
  let buf = '';
  let err = '';
  child.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  child.stdout!.on('data', (b: Buffer) => {
    buf += b.toString();
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      const w = waiting.shift();
      if (w) w(line);
      else lines.push(line);
    }
  });
  const done = new Promise<number | null>((resolve) => child.on('close', resolve));
  const next = () =>
    new Promise<string>((resolve, reject) => {
      const l = lines.shift();
      if (l !== undefined) return resolve(l);
      const t = setTimeout(() => {
        child.kill('SIGKILL');
        reject(new Error(`holder gave no answer within 20 s; stderr: ${err}`));
      }, 20_000);
      waiting.push((line) => {
        clearTimeout(t);
        resolve(line);
      });
      void done.then(() => {
        clearTimeout(t);
        reject(new Error(`holder exited; stderr: ${err}`));
      });
    });
  const step = () => {
    child.stdin!.write('\n');
    return next();
  };
  return { next, step, done };
}

/** sha256 of a file read through mmap(2) in a child. */
async function mmapSha(file: string): Promise<{ code: number | null; out: string; err: string }> {
  const script = [
    'import sys, mmap, hashlib',
    'f = open(sys.argv[1], "rb")',
    'm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)',
    'print(hashlib.sha256(m[:]).hexdigest())',
  ].join('\n');
  const r = await run(PYTHON, ['-c', script, file], { timeoutMs: 20_000 });
  return { code: r.code, out: r.stdout.trim(), err: r.stderr };
}

/** An overlay with metacopy files name → blob over lowerdir=meta::pool::miss (mounted by mount(8) in a child). */
async function overlayOver(m: MissFsMount, files: Record<string, Blob>): Promise<string> {
  const merged = await metacopyOverlay(tmp, m.mountpoint, files);
  overlays.push(merged);
  return merged;
}

describe.skipIf(!canRun)('miss filesystem: FUSE passthrough (real FUSE and overlay mounts)', () => {
  /**
   * Mounts with passthrough; skips the test on a kernel that does not offer it.
   * Backing ids are closed with the last RELEASE unless lingerMs is given.
   */
  async function mountPt(ctx: { skip: (note?: string) => void }, lingerMs = 0): Promise<MissFsMount> {
    const m = await mountFs(undefined, { passthroughLingerMs: lingerMs });
    if ((m.init.flags & InitFlag.PASSTHROUGH) === 0n) ctx.skip('kernel without FUSE passthrough');
    return m;
  }

  it('complete files are read by the kernel itself: no READ requests, directly, through an overlay with data-only lowers, and through mmap', async (ctx) => {
    const big = addBlob(blobs, randomBytes(3 * 1024 * 1024 + 77));
    const small = addBlob(blobs, 'small passthrough file\n');
    const m = await mountPt(ctx);
    expect(m.init.maxStackDepth).toBe(1);
    expect(m.stats().passthrough).toBe(true);

    const direct = await catFile(blobPath(m, big));
    expect(direct.code).toBe(0);
    expect(sha(direct.out)).toBe(big.hex);

    // The FUSE sb is stacked (depth 1) now; overlay on top of it (depth 2) must still mount.
    const merged = await overlayOver(m, { 'big.bin': big, 'small.txt': small });
    for (let i = 0; i < 2; i++) {
      const r = await catFile(join(merged, 'big.bin'));
      expect(r.code).toBe(0);
      expect(sha(r.out)).toBe(big.hex);
    }
    const rs = await catFile(join(merged, 'small.txt'));
    expect(rs.out.equals(small.data)).toBe(true);
    const mm = await mmapSha(join(merged, 'big.bin'));
    expect(mm.err).toBe('');
    expect(mm.out).toBe(big.hex);
    const mmDirect = await mmapSha(blobPath(m, small));
    expect(mmDirect.out).toBe(small.hex);
    // A ranged read in the middle.
    const dd = await run('dd', [`if=${join(merged, 'big.bin')}`, 'bs=4096', 'skip=100', 'count=3', 'status=none'], { timeoutMs: 10_000 });
    expect(dd.code).toBe(0);

    const st = m.stats();
    expect(st.reads).toBe(0);
    expect(st.bytesRead).toBe(0);
    expect(st.passthroughOpens).toBeGreaterThanOrEqual(6);
    // Every open was a passthrough open: the main thread's (opens) and any the reader thread answered while an
    // earlier open still held the backing id. No open in READ mode, or reads above would not be 0.
    expect(st.passthroughOpens).toBeGreaterThanOrEqual(st.opens);
    expect(st.opens).toBeGreaterThan(0);
    // Every reader is gone: the kernel sent RELEASE for each open and every backing id is closed.
    expect(await waitFor(() => m.stats().openFiles === 0, 10_000, 20)).toBe(true);
    expect(m.stats().backingIds).toBe(0);
    expect(provider.openFiles).toBe(0);
  });

  it('passthrough off by option: INIT does not ask for it and READs are served as before', async () => {
    const a = addBlob(blobs, randomBytes(300 * 1024));
    const m = await mountFs(undefined, { passthrough: false });
    expect(m.init.flags & InitFlag.PASSTHROUGH).toBe(0n);
    expect(m.init.maxStackDepth).toBe(0);
    const merged = await overlayOver(m, { 'a.bin': a });
    const r = await catFile(join(merged, 'a.bin'));
    expect(r.code).toBe(0);
    expect(sha(r.out)).toBe(a.hex);
    const mm = await mmapSha(join(merged, 'a.bin'));
    expect(mm.out).toBe(a.hex);
    expect(m.stats().reads).toBeGreaterThan(0);
    expect(m.stats().passthroughOpens).toBe(0);
    expect(m.stats().backingIds).toBe(0);
  });

  it('one backing id per file however many opens; the last RELEASE closes it (no leak)', async (ctx) => {
    const a = addBlob(blobs, randomBytes(200 * 1024));
    const b = addBlob(blobs, randomBytes(100 * 1024));
    const m = await mountPt(ctx);
    const h = holder([blobPath(m, a), blobPath(m, a), blobPath(m, a), blobPath(m, b)]);
    expect(await h.next()).toBe('open');
    // The first open of each file reaches the main thread; the reader answers the others with the published id.
    expect(m.stats().openFiles).toBe(2);
    expect(m.stats().opens).toBe(2);
    expect(m.stats().passthroughOpens).toBe(4);
    expect(m.stats().backingIds).toBe(2);
    expect(await h.step()).toBe(`${a.hex} ${a.hex} ${a.hex} ${b.hex}`);
    expect(await h.step()).toBe('closed');
    expect(await h.done).toBe(0);
    expect(await waitFor(() => m.stats().openFiles === 0, 10_000, 20)).toBe(true);
    expect(m.stats().backingIds).toBe(0);
    expect(m.stats().reads).toBe(0);
  });

  it('mixed modes never conflict: a file open through READ stays in READ mode, one open in passthrough shares its backing file', async (ctx) => {
    const a = addBlob(blobs, randomBytes(150 * 1024));
    const m = await mountPt(ctx);
    const file = blobPath(m, a);

    // A partially downloaded file is served through READ…
    provider.partial.add(a.hex);
    const h1 = holder([file]);
    expect(await h1.next()).toBe('open');
    expect(m.stats().passthroughOpens).toBe(0);
    // …and while it is open, a complete copy must not switch the inode to passthrough (the kernel would fail the open).
    provider.partial.delete(a.hex);
    const r1 = await catFile(file);
    expect(r1.code).toBe(0);
    expect(r1.out.equals(a.data)).toBe(true);
    expect(m.stats().passthroughOpens).toBe(0);
    expect(m.stats().reads).toBeGreaterThan(0);
    expect(await h1.step()).toBe(a.hex);
    expect(await h1.step()).toBe('closed');
    expect(await waitFor(() => m.stats().openFiles === 0, 10_000, 20)).toBe(true);

    // Passthrough once nothing holds it in READ mode.
    const h2 = holder([file]);
    expect(await h2.next()).toBe('open');
    expect(m.stats().passthroughOpens).toBe(1);
    expect(m.stats().backingIds).toBe(1);
    const readsBefore = m.stats().reads;
    // While it is open in passthrough, even a partial provider file shares the backing file.
    provider.partial.add(a.hex);
    const r2 = await catFile(file);
    expect(r2.code).toBe(0);
    expect(r2.out.equals(a.data)).toBe(true);
    expect(m.stats().passthroughOpens).toBe(2);
    expect(m.stats().backingIds).toBe(1);
    expect(m.stats().reads).toBe(readsBefore);
    expect(await h2.step()).toBe(a.hex);
    expect(await h2.step()).toBe('closed');
    expect(await waitFor(() => m.stats().openFiles === 0, 10_000, 20)).toBe(true);
    expect(m.stats().backingIds).toBe(0);
  });

  it('a file evicted from the pool while open in passthrough stays readable; a later open after a refetch works', async (ctx) => {
    const a = addBlob(blobs, randomBytes(2 * 1024 * 1024 + 5));
    const m = await mountPt(ctx);
    const merged = await overlayOver(m, { 'a.bin': a });
    const h = holder([join(merged, 'a.bin')], 64 * 1024);
    expect(await h.next()).toBe('open');
    expect(m.stats().backingIds).toBe(1);
    // Evict: drop the pool file's cached pages (so the rest really comes from its blocks), then unlink it.
    const pooled = join(blobs, a.hex);
    const ev = await run(PYTHON, ['-c', 'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)', pooled], { timeoutMs: 10_000 });
    expect(ev.code).toBe(0);
    unlinkSync(pooled);
    expect(await h.step()).toBe(a.hex);

    // Refetched: a new open while the old one is still open shares its backing file.
    addBlob(blobs, a.data);
    const r = await catFile(join(merged, 'a.bin'));
    expect(r.code).toBe(0);
    expect(sha(r.out)).toBe(a.hex);
    expect(m.stats().reads).toBe(0);
    expect(await h.step()).toBe('closed');
    expect(await waitFor(() => m.stats().openFiles === 0, 10_000, 20)).toBe(true);
    expect(m.stats().backingIds).toBe(0);
  });

  it('a backing file the kernel refuses is served through READ, and passthrough goes on for others', async (ctx) => {
    const a = addBlob(blobs, randomBytes(100 * 1024));
    const b = addBlob(blobs, randomBytes(100 * 1024));
    const m = await mountPt(ctx);
    const dirFd = openSync(blobs, 'r');
    try {
      provider.backingFdOf.set(a.hex, dirFd); // a directory: BACKING_OPEN fails (EISDIR)
      const r = await catFile(blobPath(m, a));
      expect(r.code).toBe(0);
      expect(r.out.equals(a.data)).toBe(true);
      expect(m.stats().reads).toBeGreaterThan(0);
      expect(m.stats().passthroughOpens).toBe(0);
      expect(m.stats().passthrough).toBe(true);
    } finally {
      provider.backingFdOf.delete(a.hex);
      closeSync(dirFd);
    }
    const reads = m.stats().reads;
    const rb = await catFile(blobPath(m, b));
    expect(rb.out.equals(b.data)).toBe(true);
    expect(m.stats().reads).toBe(reads);
    expect(m.stats().passthroughOpens).toBe(1);
  });

  it('a pool on a stacked filesystem (overlayfs) switches passthrough off for the session: READ serves everything', async (ctx) => {
    // The blobs live on an overlay mount: its stack depth (1) reaches the FUSE max_stack_depth (1) → ELOOP.
    const lower = join(tmp, 'ovl-lower');
    const upper = join(tmp, 'ovl-upper');
    const work = join(tmp, 'ovl-work');
    const stacked = join(tmp, 'stacked-blobs');
    for (const d of [lower, upper, work, stacked]) mkdirSync(d);
    const mo = await run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work}`, stacked], { timeoutMs: 20_000 });
    expect(mo.code).toBe(0);
    overlays.push(stacked);
    provider = new DirProvider(stacked);
    const a = addBlob(stacked, randomBytes(64 * 1024));
    const b = addBlob(stacked, randomBytes(64 * 1024));
    const m = await mountPt(ctx);
    const ra = await catFile(blobPath(m, a));
    expect(ra.code).toBe(0);
    expect(ra.out.equals(a.data)).toBe(true);
    expect(m.stats().passthrough).toBe(false);
    const rb = await catFile(blobPath(m, b));
    expect(rb.out.equals(b.data)).toBe(true);
    expect(m.stats().passthroughOpens).toBe(0);
    expect(m.stats().reads).toBeGreaterThan(0);
    expect(m.stats().backingIds).toBe(0);
  });

  it('with a linger, later opens of a file are answered by the reader thread (no provider call) until the kernel forgets it', async (ctx) => {
    const a = addBlob(blobs, randomBytes(256 * 1024));
    const b = addBlob(blobs, randomBytes(64 * 1024));
    const m = await mountPt(ctx, 600_000);
    const merged = await overlayOver(m, { 'a.bin': a, 'b.bin': b });
    for (let i = 0; i < 5; i++) {
      const r = await catFile(join(merged, 'a.bin'));
      expect(r.code).toBe(0);
      expect(sha(r.out)).toBe(a.hex);
    }
    const mm = await mmapSha(join(merged, 'a.bin'));
    expect(mm.out).toBe(a.hex);
    const h = holder([join(merged, 'a.bin'), join(merged, 'a.bin'), join(merged, 'b.bin')]);
    expect(await h.next()).toBe('open');
    expect(await h.step()).toBe(`${a.hex} ${a.hex} ${b.hex}`);
    expect(await h.step()).toBe('closed');
    expect(await h.done).toBe(0);

    const st = m.stats();
    // Only the first open of each file reached the main thread and the provider.
    expect(st.opens).toBe(2);
    expect(provider.calls.filter((c) => c.op === 'open').length).toBe(2);
    expect(st.passthroughOpens).toBe(9);
    expect(st.reads).toBe(0);
    expect(st.backingIds).toBe(2);
    expect(st.openFiles).toBe(0);

    // The kernel forgets the nodes (overlay and dentry caches dropped): their ids are closed.
    await run('umount', [merged], { timeoutMs: 20_000 });
    overlays.splice(overlays.indexOf(merged), 1);
    writeFileSync('/proc/sys/vm/drop_caches', '2');
    expect(await waitFor(() => m.stats().backingIds === 0, 10_000, 50)).toBe(true);
    expect(m.stats().liveNodes).toBe(0);
  });
});

