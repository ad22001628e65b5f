/**
 * The miss filesystem with noOpen (FUSE_NO_OPEN_SUPPORT) on real mounts: opens
 * cost no request, pages stay cached across opens, READs come with fh 0.
 * Needs root, /dev/fuse and overlayfs with data-only layers.
 *
 * As in missfs.test.ts, the FUSE server runs on this process's main thread,
 * so every access to a mount goes through a child process.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/core/log.js';
import { mountMissFs, type MissFsMount } from '../../src/core/missfs/index.js';
import { InitFlag } from '../../src/core/missfs/protocol.js';
import { run, waitFor } from '../helpers/proc.js';
import { addBlob, DirProvider, type Blob } from './fixtures/missfs-provider.js';
import { metacopyOverlay } from './fixtures/missfs-overlay.js';

const canRun = process.getuid?.() === 0 && existsSync('/dev/fuse');

let tmp: string;
let blobs: string;
let provider: DirProvider;
const overlays: string[] = [];
const sessions: MissFsMount[] = [];

async function mountNoOpen(ctx: { skip: (note: string) => void }, failedIdleMs?: number): Promise<MissFsMount> {
  const m = await mountMissFs({ mountpoint: join(tmp, 'miss'), provider, logger: silentLogger(), noOpen: true, ...(failedIdleMs !== undefined ? { noOpenFailedIdleMs: failedIdleMs } : {}) });
  sessions.push(m);
  if ((m.init.flags & InitFlag.NO_OPEN_SUPPORT) === 0n) ctx.skip('kernel without FUSE_NO_OPEN_SUPPORT');
  return m;
}

/**
 * After an invalidation of b's pages (written from the threadpool): reads of b reach the daemon again
 * (its READ count passes `reads`) within 10 s, and return b's bytes.
 */
async function expectReadAgainByDaemon(m: MissFsMount, b: Blob, reads: number): Promise<void> {
  let again: Buffer | undefined;
  const seen = await waitFor(
    async () => {
      again = (await cat(blobPath(m, b))).out;
      return m.stats().reads > reads;
    },
    10_000,
    100,
  );
  expect(seen).toBe(true);
  expect(again!.equals(b.data)).toBe(true);
}

function blobPath(m: MissFsMount, b: Blob): string {
  return join(m.mountpoint, 'sha256', b.hex.slice(0, 2), b.hex);
}

/** `cat file` in a child: its stdout as a Buffer, and its exit code. */
async function cat(file: string): Promise<{ code: number | null; out: Buffer; stderr: string }> {
  const r = await run('bash', ['-c', 'set -o pipefail; cat "$1" | base64 -w0', 'bash', file], { timeoutMs: 20_000 });
  return { code: r.code, out: Buffer.from(r.stdout, 'base64'), stderr: r.stderr };
}

/** Requests that reached the server (main thread or reader thread). */
function requests(m: MissFsMount): number {
  const s = m.stats();
  return s.requests + s.staticReplies + s.passthroughOpens;
}

/** An overlay over meta::pool::miss where each name is a metacopy file redirected to its blob. */
async function overlayOf(m: MissFsMount, files: Record<string, Blob>): Promise<string> {
  const merged = await metacopyOverlay(tmp, m.mountpoint, files);
  overlays.push(merged);
  return merged;
}

beforeEach(() => {
  tmp = mkdtempSync('/tmp/gmiss-noopen-');
  blobs = join(tmp, 'blobs');
  mkdirSync(blobs);
  provider = new DirProvider(blobs);
});

afterEach(async () => {
  for (const o of overlays.splice(0).reverse()) await run('umount', ['-l', o], { timeoutMs: 10_000 });
  for (const m of sessions.splice(0).reverse()) {
    try {
      await m.unmount({ timeoutMs: 5_000 });
    } catch {
      await run('umount', ['-l', m.mountpoint], { timeoutMs: 10_000 });
    }
  }
  if (!readFileSync('/proc/self/mountinfo', 'utf8').includes(tmp)) rmSync(tmp, { recursive: true, force: true });
});

describe.skipIf(!canRun)('miss filesystem with noOpen (real FUSE and overlay mounts)', () => {
  it('a file read again costs no request: no OPEN, READ, FLUSH or RELEASE after the first read', async (ctx) => {
    const a = addBlob(blobs, 'read me again and again\n'.repeat(300));
    const m = await mountNoOpen(ctx);
    expect(m.stats().noOpen).toBe(true);
    expect(m.stats().passthrough).toBe(false);
    const first = await cat(blobPath(m, a));
    expect(first.code).toBe(0);
    expect(first.out.equals(a.data)).toBe(true);
    expect(m.stats().reads).toBeGreaterThanOrEqual(1);
    const before = requests(m);
    for (let i = 0; i < 5; i++) {
      const again = await cat(blobPath(m, a));
      expect(again.out.equals(a.data)).toBe(true);
    }
    expect(requests(m)).toBe(before);
    expect(provider.calls.filter((c) => c.op === 'open')).toHaveLength(1);
    expect(m.stats().passthroughOpens).toBe(0);
  });

  it('through an overlay: the first open of an unfetched file binds it to FUSE, and reading it again in that overlay never reaches the daemon', async (ctx) => {
    const a = addBlob(blobs, randomBytes(200_000));
    const b = addBlob(blobs, 'second file\n');
    const m = await mountNoOpen(ctx);
    const merged = await overlayOf(m, { 'a.bin': a, 'b.txt': b });
    expect((await cat(join(merged, 'a.bin'))).out.equals(a.data)).toBe(true);
    expect((await cat(join(merged, 'b.txt'))).out.equals(b.data)).toBe(true);
    const before = requests(m);
    const readsBefore = m.stats().reads;
    for (let i = 0; i < 4; i++) {
      expect((await cat(join(merged, 'a.bin'))).out.equals(a.data)).toBe(true);
      expect((await cat(join(merged, 'b.txt'))).out.equals(b.data)).toBe(true);
    }
    expect(m.stats().reads).toBe(readsBefore);
    expect(requests(m)).toBe(before);
  });

  it('a big file is read in many READs with the right bytes; mmap works too', async (ctx) => {
    const big = addBlob(blobs, randomBytes(3 * 1024 * 1024 + 123));
    const m = await mountNoOpen(ctx);
    const r = await cat(blobPath(m, big));
    expect(r.code).toBe(0);
    expect(r.out.equals(big.data)).toBe(true);
    expect(m.stats().reads).toBeGreaterThanOrEqual(3);
    // python3's mmap reads the pages through the same cache.
    const py = await run(
      'python3',
      ['-c', 'import mmap,sys,hashlib;f=open(sys.argv[1],"rb");m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ);print(hashlib.sha256(m).hexdigest())', blobPath(m, big)],
      { timeoutMs: 20_000 },
    );
    expect(py.stdout.trim()).toBe(big.hex);
  });

  it('a failed read gives EIO; the file stays open (reads fail without opening it again) until it was idle for failedIdleMs', async (ctx) => {
    const a = addBlob(blobs, 'flaky\n'.repeat(1000));
    // Every read fails (the kernel retries a failed readahead with a read of its own).
    provider.failReads.set(a.hex, 1_000);
    const m = await mountNoOpen(ctx, 1_000);
    const bad = await cat(blobPath(m, a));
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/Input\/output error/);
    const opens = () => provider.calls.filter((c) => c.op === 'open' && c.digest === a.digest).length;
    // One open for the failed readahead and the read the kernel retried: the file was not opened again
    // for each READ (with a streamed download, each open would start a whole new download).
    expect(opens()).toBe(1);
    expect(provider.openFiles).toBe(1);
    // Within failedIdleMs, another reader gets the same file: EIO again, no new open.
    expect((await cat(blobPath(m, a))).code).not.toBe(0);
    expect(opens()).toBe(1);
    // Idle for failedIdleMs: closed; the next read opens it again (the "next open") and succeeds.
    provider.failReads.delete(a.hex);
    expect(await waitFor(async () => provider.openFiles === 0, 10_000, 100)).toBe(true);
    const good = await cat(blobPath(m, a));
    expect(good.code).toBe(0);
    expect(good.out.equals(a.data)).toBe(true);
    expect(opens()).toBe(2);
  });

  it('dropBacking drops the pages the kernel cached: the next read reaches the daemon again', async (ctx) => {
    const a = addBlob(blobs, 'cached, then dropped\n'.repeat(500));
    const m = await mountNoOpen(ctx);
    expect((await cat(blobPath(m, a))).out.equals(a.data)).toBe(true);
    const reads = m.stats().reads;
    expect((await cat(blobPath(m, a))).out.equals(a.data)).toBe(true);
    expect(m.stats().reads).toBe(reads);
    expect(m.dropBacking(a.hex)).toBe(true);
    await expectReadAgainByDaemon(m, a, reads);
  });

  it('dropUnverified (a download ended without verifying) drops the cached pages but keeps the file open', async (ctx) => {
    const a = addBlob(blobs, 'served before its digest was known\n'.repeat(500));
    const m = await mountNoOpen(ctx);
    expect((await cat(blobPath(m, a))).out.equals(a.data)).toBe(true);
    const reads = m.stats().reads;
    const opens = provider.calls.filter((c) => c.op === 'open' && c.digest === a.digest).length;
    m.dropUnverified(a.hex);
    await expectReadAgainByDaemon(m, a, reads);
    // The same file served the new READs (a failed download's file keeps failing them; see implicit-files.ts).
    expect(provider.calls.filter((c) => c.op === 'open' && c.digest === a.digest).length).toBe(opens);
  });

  it('files the kernel forgets are closed; unmount closes the rest', async (ctx) => {
    const files = Array.from({ length: 4 }, (_, i) => addBlob(blobs, `forget me ${i}\n`.repeat(100)));
    const m = await mountNoOpen(ctx);
    for (const f of files) expect((await cat(blobPath(m, f))).out.equals(f.data)).toBe(true);
    expect(provider.openFiles).toBe(4);
    expect(m.stats().openFiles).toBe(4);
    writeFileSync('/proc/sys/vm/drop_caches', '2');
    expect(await waitFor(() => m.stats().liveNodes === 0, 10_000, 50)).toBe(true);
    expect(await waitFor(() => provider.openFiles === 0, 5_000, 50)).toBe(true);
    expect((await cat(blobPath(m, files[0]!))).out.equals(files[0]!.data)).toBe(true);
    expect(provider.openFiles).toBe(1);
    await m.unmount({ timeoutMs: 5_000 });
    expect(await waitFor(() => provider.openFiles === 0, 5_000, 50)).toBe(true);
  });
});
