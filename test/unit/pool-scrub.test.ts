/**
 * The pool scrub (src/core/pool/scrub.ts, scrubber.ts) on a real pool
 * directory: corruptions of every kind are found and removed, races with
 * eviction and refetch are not mistaken for corruption, the rate bound holds
 * per window, and `gear cache verify` reaches a daemon's scrubber through its
 * request file. Also the fs-verity probe's answer on this machine.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, statfsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { cacheStatus, cacheVerify } from '../../src/cli/cache.js';
import { openPool, type Pool, type PoolOptions } from '../../src/core/pool/pool.js';
import { ByteRateLimiter, scrubPool } from '../../src/core/pool/scrub.js';
import {
  PoolScrubber,
  formatInterval,
  integrityLine,
  parseScrubInterval,
  parseScrubRate,
  readScrubState,
  requestScrub,
} from '../../src/core/pool/scrubber.js';
import { describeVerityAnswer, kernelConfigHasVerity, probeFsVerity } from '../../src/core/pool/verity.js';

const hexOf = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const digestOf = (b: Buffer) => `sha256:${hexOf(b)}`;

let root: string;
const pools: Pool[] = [];
const scrubbers: PoolScrubber[] = [];

async function open(opts: Partial<PoolOptions> = {}): Promise<Pool> {
  const p = await openPool({ root, capBytes: '1GiB', atimeSampleMs: 0, snapshotDelayMs: 10, ...opts });
  pools.push(p);
  return p;
}

async function put(pool: Pool, body: Buffer): Promise<string> {
  const d = digestOf(body);
  await pool.addFromStream(Readable.from([body]), d, body.length);
  return d;
}

/** Rewrites a pool file behind the pool's back (it is mode 0444; root writes anyway). */
async function tamper(pool: Pool, digest: string, f: (b: Buffer) => Buffer): Promise<void> {
  const file = pool.path(digest);
  const body = await fs.readFile(file);
  await fs.writeFile(file, f(Buffer.from(body)));
}

beforeEach(async () => {
  root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-scrub-'));
});

afterEach(async () => {
  for (const s of scrubbers.splice(0)) await s.close();
  for (const p of pools.splice(0)) await p.close();
  await fs.rm(root, { recursive: true, force: true });
});

describe('scrubPool', () => {
  it('finds a flipped byte, a truncation, other content and a file under the wrong digest, removes them and keeps the good files', async () => {
    const pool = await open();
    const good = await Promise.all([randomBytes(70_000), randomBytes(10)].map((b) => put(pool, b)));
    const flip = await put(pool, randomBytes(100_000));
    const trunc = await put(pool, randomBytes(50_000));
    const other = await put(pool, randomBytes(4096));
    await tamper(pool, flip, (b) => ((b[77_777] ^= 0x01), b));
    await tamper(pool, trunc, (b) => b.subarray(0, 49_999));
    await tamper(pool, other, () => randomBytes(4096));
    // A file under a digest it does not have, put there behind the daemon's back (the pool never knew it).
    const stranger = randomBytes(3000);
    const wrongName = digestOf(randomBytes(3000));
    await fs.mkdir(path.dirname(pool.path(wrongName)), { recursive: true });
    await fs.writeFile(pool.path(wrongName), stranger, { mode: 0o444 });

    const r = await scrubPool(pool, { rate: 0 });
    expect(r.totalFiles).toBe(6);
    expect(r.files).toBe(6);
    expect(r.bad).toBe(4);
    expect(r.removed).toBe(4);
    expect(r.gone).toBe(0);
    const byDigest = Object.fromEntries(r.badFiles.map((b) => [b.digest, b]));
    expect(Object.keys(byDigest).sort()).toEqual([flip, trunc, other, wrongName].sort());
    expect(byDigest[wrongName]!.actual).toBe(digestOf(stranger));
    expect(byDigest[trunc]!.size).toBe(49_999);
    expect(byDigest[flip]!.path).toBe(pool.path(flip));
    for (const d of [flip, trunc, other, wrongName]) {
      expect(existsSync(pool.path(d))).toBe(false);
      expect(pool.has(d)).toBe(false);
    }
    for (const d of good) {
      expect(pool.has(d)).toBe(true);
      expect(hexOf(await fs.readFile(pool.path(d)))).toBe(d.slice(7));
    }
    // A removal is not an eviction; the pool's accounting follows.
    expect(pool.stat().counters.evictions).toBe(0);
    expect(pool.stat().files).toBe(2);
    // A second scrub finds the pool clean.
    const again = await scrubPool(pool, { rate: 0 });
    expect(again.bad).toBe(0);
    expect(again.files).toBe(2);
  });

  it('removes a symlink under a digest name, ignores names no redirect can reach, and leaves them alone', async () => {
    const pool = await open();
    const d = await put(pool, randomBytes(1000));
    const target = path.join(root, 'elsewhere');
    await fs.writeFile(target, 'not pool data');
    const linkName = digestOf(Buffer.from('link'));
    await fs.mkdir(path.dirname(pool.path(linkName)), { recursive: true });
    await fs.symlink(target, pool.path(linkName));
    const junk = path.join(path.dirname(pool.path(d)), 'README');
    await fs.writeFile(junk, 'admin note');
    const r = await scrubPool(pool, { rate: 0 });
    expect(r.bad).toBe(1);
    expect(r.badFiles[0]!.digest).toBe(linkName);
    expect(r.badFiles[0]!.actual).toMatch(/not a regular file/);
    expect(r.removed).toBe(1);
    expect(existsSync(pool.path(linkName))).toBe(false);
    expect(existsSync(target)).toBe(true);
    expect(r.ignored).toBe(1);
    expect(existsSync(junk)).toBe(true);
  });

  it('marks files adopted at startup as verified when they hash right', async () => {
    const p1 = await open();
    const d = await put(p1, randomBytes(5000));
    await p1.close();
    pools.splice(0);
    await fs.rm(path.join(root, 'pool/.meta/state.json'));
    const pool = await open();
    expect(pool.stat().unverifiedFiles).toBe(1);
    const r = await scrubPool(pool, { rate: 0 });
    expect(r.bad).toBe(0);
    expect(pool.stat().unverifiedFiles).toBe(0);
    expect(pool.has(d)).toBe(true);
  });

  it('a read-only pool reports bad files without removing them', async () => {
    const p1 = await open();
    const d = await put(p1, randomBytes(5000));
    await tamper(p1, d, (b) => ((b[0] ^= 0xff), b));
    await p1.close();
    pools.splice(0);
    const ro = await open({ readOnly: true });
    const r = await scrubPool(ro, { rate: 0 });
    expect(r.bad).toBe(1);
    expect(r.removed).toBe(0);
    expect(r.badFiles[0]!.outcome).toBe('read-only');
    expect(existsSync(ro.path(d))).toBe(true);
  });

  it('files evicted during the scrub are counted as gone, never as bad', async () => {
    const pool = await open();
    const ds: string[] = [];
    for (let i = 0; i < 6; i++) ds.push(await put(pool, randomBytes(40_000)));
    let t = 0;
    let evicted = false;
    const r = await scrubPool(pool, {
      rate: 64 * 1024,
      now: () => t,
      sleep: async (ms) => {
        t += ms;
        // While the first file is being hashed (its fd open), every file is evicted.
        if (!evicted) {
          evicted = true;
          const res = await pool.prune({ all: true });
          expect(res.files).toBe(6);
        }
      },
    });
    expect(evicted).toBe(true);
    expect(r.bad).toBe(0);
    expect(r.removed).toBe(0);
    expect(r.gone + r.files).toBe(6);
    expect(r.gone).toBeGreaterThanOrEqual(4);
    expect(r.files).toBeGreaterThanOrEqual(1); // the open one read its (unlinked) inode to the end
  });

  it('a bad file replaced by a fresh fetch while it was hashed is not removed: the good copy stays', async () => {
    const pool = await open();
    const body = randomBytes(300_000);
    const d = await put(pool, body);
    await tamper(pool, d, (b) => ((b[1] ^= 0x10), b));
    let t = 0;
    let refetched = false;
    const r = await scrubPool(pool, {
      rate: 64 * 1024,
      now: () => t,
      sleep: async (ms) => {
        t += ms;
        if (!refetched) {
          // Evicted and fetched again (verified) while the scrub still reads the corrupt inode.
          refetched = true;
          await pool.prune({ all: true });
          await put(pool, body);
        }
      },
    });
    expect(refetched).toBe(true);
    expect(r.bad).toBe(1);
    expect(r.badFiles[0]!.outcome).toBe('replaced');
    expect(r.removed).toBe(0);
    expect(pool.has(d)).toBe(true);
    expect(hexOf(await fs.readFile(pool.path(d)))).toBe(d.slice(7));
  });

  it('does not remove a bad file while a fetch of the same digest is writing (the commit replaces it)', async () => {
    const pool = await open();
    const body = randomBytes(20_000);
    const d = await put(pool, body);
    await tamper(pool, d, (b) => b.subarray(0, 100));
    const w = await pool.beginWrite(d, body.length);
    const r = await scrubPool(pool, { rate: 0 });
    expect(r.bad).toBe(1);
    expect(r.badFiles[0]!.outcome).toBe('busy');
    await w.write(body);
    await w.commit();
    expect(hexOf(await fs.readFile(pool.path(d)))).toBe(d.slice(7));
    expect((await scrubPool(pool, { rate: 0 })).bad).toBe(0);
  });

  it('reads at most rate × window bytes in every window (counted, not timed)', async () => {
    const pool = await open();
    let total = 0;
    for (let i = 0; i < 12; i++) {
      const b = randomBytes(30_000 + i * 7_001);
      total += b.length;
      await put(pool, b);
    }
    const rate = 100 * 1024;
    const windowMs = 500;
    const budget = (rate * windowMs) / 1000;
    let t = 1_000_000; // fake clock in ms; only sleep advances it
    const perWindow = new Map<number, number>();
    let lastBytes = 0;
    let sleeps = 0;
    const r = await scrubPool(pool, {
      rate,
      windowMs,
      now: () => t,
      sleep: async (ms) => {
        sleeps++;
        t += ms;
      },
      onProgress: (p) => {
        const w = Math.floor(t / windowMs);
        perWindow.set(w, (perWindow.get(w) ?? 0) + (p.bytes - lastBytes));
        lastBytes = p.bytes;
      },
    });
    expect(r.bad).toBe(0);
    expect(r.bytes).toBe(total);
    expect([...perWindow.values()].reduce((a, b) => a + b, 0)).toBe(total);
    for (const [, bytes] of perWindow) expect(bytes).toBeLessThanOrEqual(budget);
    expect(perWindow.size).toBeGreaterThanOrEqual(Math.ceil(total / budget));
    expect(sleeps).toBeGreaterThan(0);
  });

  it('ByteRateLimiter grants a full budget per window and refuses a take larger than the budget', async () => {
    let t = 0;
    const l = new ByteRateLimiter(1000, 1000, () => t, async (ms) => void (t += ms));
    await l.take(600);
    await l.take(400);
    expect(t).toBe(0);
    await l.take(1);
    expect(t).toBe(1000);
    await expect(l.take(1001)).rejects.toThrow(/exceeds the window budget/);
    expect(() => new ByteRateLimiter(0)).toThrow(/more than 0/);
  });

  it('stops at an abort and says so', async () => {
    const pool = await open();
    for (let i = 0; i < 3; i++) await put(pool, randomBytes(50_000));
    const ac = new AbortController();
    let t = 0;
    const r = await scrubPool(pool, { rate: 32 * 1024, signal: ac.signal, now: () => t, sleep: async (ms) => ((t += ms), ac.abort()) });
    expect(r.aborted).toBe(true);
    expect(r.files).toBeLessThan(3);
    expect(r.bad).toBe(0);
  });
});

describe('settings', () => {
  it('parses rates and intervals, with 0/off for no periodic scrub', () => {
    expect(parseScrubRate('50MiB')).toBe(50 * 1024 * 1024);
    expect(parseScrubRate('10MB/s')).toBe(10_000_000);
    expect(() => parseScrubRate('0')).toThrow(/more than 0/);
    expect(() => parseScrubRate('fast', 'GEAR_SCRUB_RATE')).toThrow(/GEAR_SCRUB_RATE "fast"/);
    expect(parseScrubInterval('24h')).toBe(86_400_000);
    expect(parseScrubInterval('7d')).toBe(7 * 86_400_000);
    expect(parseScrubInterval('0')).toBe(0);
    expect(parseScrubInterval('off')).toBe(0);
    expect(() => parseScrubInterval('soon')).toThrow(/scrub interval/);
    expect(formatInterval(86_400_000)).toBe('24h');
    expect(formatInterval(7 * 86_400_000)).toBe('7d');
    expect(formatInterval(3 * 3_600_000)).toBe('3h');
    expect(integrityLine({ rate: 50 * 1024 * 1024, intervalMs: 24 * 3_600_000 }, { supported: false, answer: 'EOPNOTSUPP', detail: 'not supported by this kernel (CONFIG_FS_VERITY is not set)' })).toBe(
      'scrub every 24h at 50.0MiB/s (fs-verity: not supported by this kernel (CONFIG_FS_VERITY is not set))',
    );
    expect(integrityLine({ rate: 1, intervalMs: 0 }, null)).toMatch(/^no periodic scrub/);
  });
});

describe('PoolScrubber', () => {
  it('serves a request of `gear cache verify` (request file), records the report, and counts totals across restarts', async () => {
    const pool = await open();
    const good = await put(pool, randomBytes(10_000));
    const bad = await put(pool, randomBytes(10_000));
    await tamper(pool, bad, (b) => ((b[5000] ^= 4), b));
    const s = await PoolScrubber.start({ pool, intervalMs: 0, pollMs: 100, progressMs: 0 });
    scrubbers.push(s);
    const seen: number[] = [];
    const rec = await requestScrub(pool.dir, { rate: 10 * 1024 * 1024, pollMs: 20, onProgress: (p) => seen.push(p.files) });
    expect(rec.id).toMatch(/^[a-z0-9]+-[a-f0-9]{12}$/);
    expect(rec.rate).toBe(10 * 1024 * 1024);
    expect(rec.bad).toBe(1);
    expect(rec.badFiles[0]!.digest).toBe(bad);
    expect(rec.removed).toBe(1);
    expect(pool.has(bad)).toBe(false);
    expect(pool.has(good)).toBe(true);
    expect(existsSync(path.join(pool.dir, '.meta/scrub-request.json'))).toBe(false);
    const st = await readScrubState(pool.dir);
    expect(st!.last!.id).toBe(rec.id);
    expect(st!.totals).toEqual({ runs: 1, bad: 1, removed: 1 });
    expect(s.status().find(([k]) => k === 'Pool Scrub')![1]).toMatch(/1 bad, 1 removed/);
    await s.close();
    // A restart keeps the totals and the last report.
    const s2 = await PoolScrubber.start({ pool, intervalMs: 0, pollMs: 100 });
    scrubbers.push(s2);
    expect(s2.stats().totals.runs).toBe(1);
    expect(s2.stats().last!.id).toBe(rec.id);
  });

  it('refuses a malformed request and keeps serving', async () => {
    const pool = await open();
    await put(pool, randomBytes(1000));
    const s = await PoolScrubber.start({ pool, intervalMs: 0, pollMs: 50 });
    scrubbers.push(s);
    await fs.writeFile(path.join(pool.dir, '.meta/scrub-request.json'), JSON.stringify({ id: '../../etc', rate: -1 }));
    for (let i = 0; i < 100 && existsSync(path.join(pool.dir, '.meta/scrub-request.json')); i++) await new Promise((r) => setTimeout(r, 20));
    expect(existsSync(path.join(pool.dir, '.meta/scrub-request.json'))).toBe(false);
    expect(s.stats().totals.runs).toBe(0);
    const rec = await requestScrub(pool.dir, { pollMs: 20 });
    expect(rec.bad).toBe(0);
    expect(rec.files).toBe(1);
  });

  it('scrubs on its own every interval', async () => {
    const pool = await open();
    const bad = await put(pool, randomBytes(2000));
    await tamper(pool, bad, () => Buffer.from('x'));
    const s = await PoolScrubber.start({ pool, intervalMs: 100, pollMs: 1000 });
    scrubbers.push(s);
    expect(s.stats().nextRunAt).not.toBeNull();
    for (let i = 0; i < 200 && s.stats().totals.runs < 2; i++) await new Promise((r) => setTimeout(r, 20));
    expect(s.stats().totals.runs).toBeGreaterThanOrEqual(2);
    expect(s.stats().totals.bad).toBe(1); // removed by the first run, so the second finds none
    expect(pool.has(bad)).toBe(false);
  });

  it('a request nobody takes fails with a remedy and leaves no request file behind', async () => {
    const pool = await open();
    await expect(requestScrub(pool.dir, { pickupTimeoutMs: 300, pollMs: 20 })).rejects.toThrow(/did not take the scrub request.*Stop it and run `gear cache verify` again/);
    expect(existsSync(path.join(pool.dir, '.meta/scrub-request.json'))).toBe(false);
  });
});

describe('gear cache verify and status', () => {
  it('scrubs offline when no daemon holds the pool; status shows the integrity lines', async () => {
    const p1 = await open();
    const bad = await put(p1, randomBytes(3000));
    await put(p1, randomBytes(3000));
    await tamper(p1, bad, (b) => ((b[7] ^= 1), b));
    await p1.close();
    pools.splice(0);
    const progress: number[] = [];
    const r = await cacheVerify({ root, rate: 1024 * 1024, onProgress: (p) => progress.push(p.bytes) });
    expect(r.by).toBe('offline');
    expect(r.bad).toBe(1);
    expect(r.removed).toBe(1);
    expect(progress.length).toBeGreaterThan(0);
    const st = await cacheStatus(root);
    expect(st.files).toBe(1);
    expect(st.scrub).toMatch(/2 files, .*1 bad, 1 removed/);
    expect(st.integrity).toMatch(/^no gear daemon with scrub has opened this pool: .*\(fs-verity: /);
  });

  it('asks the daemon holding the pool', async () => {
    const pool = await open();
    const bad = await put(pool, randomBytes(3000));
    await tamper(pool, bad, () => randomBytes(3000));
    scrubbers.push(await PoolScrubber.start({ pool, intervalMs: 3_600_000, pollMs: 100 }));
    const r = await cacheVerify({ root });
    expect(r.by).toBe('daemon');
    expect(r.bad).toBe(1);
    expect(pool.has(bad)).toBe(false);
    const st = await cacheStatus(root);
    expect(st.integrity).toMatch(/^scrub every 1h at 50\.0MiB\/s \(fs-verity: /);
    expect(st.lockedBy).not.toBeNull();
  });
});

describe('fs-verity probe', () => {
  it('answers as the kernel config says, without changing the probed file', async () => {
    const file = path.join(root, 'probe-me');
    await fs.writeFile(file, 'x');
    const before = await fs.stat(file);
    const p = await probeFsVerity(root, file);
    const kernel = kernelConfigHasVerity();
    if (kernel === false) {
      // This machine and CI: a kernel without CONFIG_FS_VERITY.
      expect(p.supported).toBe(false);
      expect(['EOPNOTSUPP', 'ENOTTY']).toContain(p.answer);
      if (statfsSync(root).type === 0xef53) expect(p.detail).toBe('not supported by this kernel (CONFIG_FS_VERITY is not set)');
    } else if (kernel === true && statfsSync(root).type === 0xef53) {
      expect(['ENODATA', 'EOPNOTSUPP']).toContain(p.answer);
    }
    expect((await fs.stat(file)).mtimeMs).toBe(before.mtimeMs);
    // Without a file it makes a temporary one and removes it.
    const q = await probeFsVerity(root);
    expect(q.answer).toBe(p.answer);
    expect((await fs.readdir(root)).filter((n) => n.startsWith('.verity-probe'))).toEqual([]);
  });

  it('tmpfs does not know the ioctl', async () => {
    if (!existsSync('/dev/shm')) return;
    const dir = await fs.mkdtemp('/dev/shm/gear-verity-');
    try {
      if (statfsSync(dir).type !== 0x01021994) return;
      const p = await probeFsVerity(dir);
      expect(p.supported).toBe(false);
      expect(p.answer).toBe('ENOTTY');
      expect(p.detail).toBe('not supported by tmpfs');
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it('names the cause for each answer', () => {
    expect(describeVerityAnswer('ENODATA', 'ext4', true, true).supported).toBe(true);
    expect(describeVerityAnswer('EOPNOTSUPP', 'ext4', false, false).detail).toMatch(/CONFIG_FS_VERITY is not set/);
    expect(describeVerityAnswer('EOPNOTSUPP', 'ext4', true, true).detail).toMatch(/tune2fs -O verity/);
    expect(describeVerityAnswer('ENOTTY', 'xfs', true, false).detail).toBe('not supported by xfs');
  });
});
