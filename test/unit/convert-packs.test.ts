/**
 * Format v3 pack layout (src/convert/pack-plan.ts) and the member stage with
 * real worker threads and the real zstd (src/convert/member-stage.ts,
 * member-pool.ts): order, the 32 MiB bound, chunking, raw fallback.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { zstdDecompress } from '../../src/core/sys/zstd.js';
import { MemberPool } from '../../src/convert/member-pool.js';
import { MemberStage, type StagedContent } from '../../src/convert/member-stage.js';
import { CHUNK_BYTES, chunkCount, layoutOrder, layoutPacks, memberEncoding, PACK_MAX_BYTES } from '../../src/convert/pack-plan.js';

const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const MiB = 1024 * 1024;

describe('pack layout', () => {
  it('orders contents by the prefetch list first, then by first path; each content once', () => {
    const files = [
      { path: 'a', digest: 'A' },
      { path: 'b', digest: 'B' },
      { path: 'c', digest: 'A' }, // same content as a: laid out once, at a's place
      { path: 'd', digest: 'D' },
      { path: 'e', digest: 'E' },
    ];
    expect(layoutOrder(files)).toEqual(['A', 'B', 'D', 'E']);
    expect(layoutOrder(files, ['e', 'c', 'nope', 'a'])).toEqual(['E', 'A', 'B', 'D']);
  });

  it('fills packs up to the bound; a content that does not fit starts the next pack; chunks stay contiguous and in order', () => {
    const m = (length: number) => ({ length });
    const contents = [
      { digest: 'a', members: [m(10)] },
      { digest: 'b', members: [m(50)] },
      { digest: 'c', members: [m(45)] }, // 60 + 45 > 100: starts pack 2
      { digest: 'big', members: [m(30), m(30), m(30), m(30)] }, // 120 > 100: spans packs, starting in the current one
      { digest: 'd', members: [m(100)] },
      { digest: 'e', members: [m(150)] }, // longer than a pack: a pack of its own
    ];
    const packs = layoutPacks(contents, 100);
    expect(packs.map((p) => p.members.map((x) => x.member.length))).toEqual([[10, 50], [45, 30], [30, 30, 30], [100], [150]]);
    expect(packs.map((p) => p.size)).toEqual([60, 75, 90, 100, 150]);
    for (const p of packs) {
      let at = 0;
      for (const x of p.members) {
        expect(x.offset).toBe(at);
        at += x.member.length;
      }
      if (p.members.length > 1) expect(p.size).toBeLessThanOrEqual(100);
    }
    // the chunks of 'big' are in order: the same objects, consecutive across packs 1 and 2
    const flat = packs.flatMap((p) => p.members.map((x) => x.member));
    const big = contents[3]!.members;
    const i = flat.indexOf(big[0]!);
    expect(flat.slice(i, i + 4)).toEqual(big);
    expect(PACK_MAX_BYTES).toBe(32 * MiB);
  });

  it('chunks files of 4 MiB and more in 1 MiB chunks; stores a member raw unless zstd saves 10%', () => {
    expect(chunkCount(4 * MiB - 1)).toBe(0);
    expect(chunkCount(4 * MiB)).toBe(4);
    expect(chunkCount(4 * MiB + 1)).toBe(5);
    expect(CHUNK_BYTES).toBe(MiB);
    expect(memberEncoding(1000, 900)).toBe('zstd');
    expect(memberEncoding(1000, 901)).toBe('raw');
  });
});

describe('member stage (worker threads, zstd)', () => {
  let dir: string;
  let pool: MemberPool;
  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), 'gear-packs-test-'));
    pool = await MemberPool.start({ dir, known: [], threads: 2 });
  });
  afterAll(async () => {
    await pool?.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const body = (b: Buffer) =>
    (async function* () {
      for (let i = 0; i < b.length; i += 100_000) yield b.subarray(i, i + 100_000);
    })();

  async function stored(c: StagedContent, i: number): Promise<Buffer> {
    const m = c.members[i]!;
    if (m.src.kind !== 'local') throw new Error('not local');
    const spool = await readFile(m.src.file);
    const bytes = spool.subarray(m.src.offset, m.src.offset + m.length);
    return m.encoding === 'zstd' ? zstdDecompress(bytes, m.size) : Buffer.from(bytes);
  }

  it('stores compressible files as zstd, incompressible ones raw, and chunks big files with per-chunk digests', async () => {
    const stage = new MemberStage(dir, pool, new Map(), new Map());
    const text = Buffer.from('a compressible line of text\n'.repeat(5000));
    const noise = randomBytes(200_000);
    const big = Buffer.concat([randomBytes(2 * MiB), Buffer.alloc(2 * MiB + 12345, 7)]); // 4 MiB + 12345: 5 chunks
    const done = await Promise.all([text, noise, big, text].map(async (b) => (await stage.addDeferred(body(b), b.length)).done));
    await stage.finish();
    expect(done.map((d) => d.digest)).toEqual([text, noise, big, text].map((b) => `sha256:${hex(b)}`));
    expect(stage.contents.size).toBe(3);

    const t = stage.contents.get(`sha256:${hex(text)}`)!;
    expect(t.chunkSize).toBeUndefined();
    expect(t.members).toHaveLength(1);
    expect(t.members[0]!.encoding).toBe('zstd');
    expect(t.members[0]!.length).toBeLessThan(text.length / 10);
    expect((await stored(t, 0)).equals(text)).toBe(true);

    const n = stage.contents.get(`sha256:${hex(noise)}`)!;
    expect(n.members[0]!.encoding).toBe('raw');
    expect(n.members[0]!.length).toBe(noise.length);
    expect((await stored(n, 0)).equals(noise)).toBe(true);

    const g = stage.contents.get(`sha256:${hex(big)}`)!;
    expect(g.chunkSize).toBe(MiB);
    expect(g.members.map((m) => m.size)).toEqual([MiB, MiB, MiB, MiB, 12345]);
    expect(g.members.slice(0, 2).map((m) => m.encoding)).toEqual(['raw', 'raw']);
    expect(g.members.slice(2).map((m) => m.encoding)).toEqual(['zstd', 'zstd', 'zstd']);
    const parts: Buffer[] = [];
    for (let i = 0; i < g.members.length; i++) {
      const b = await stored(g, i);
      expect(hex(b)).toBe(g.members[i]!.hex);
      parts.push(b);
    }
    expect(Buffer.concat(parts).equals(big)).toBe(true);
  });

  it('the reading waits for the workers: members handed over and not back stay within the bound', async () => {
    const stage = new MemberStage(dir, pool, new Map(), new Map());
    const files = Array.from({ length: 2000 }, () => randomBytes(1000));
    expect(files.length).toBeGreaterThan(stage.maxTasks + 64);
    let given = 0;
    let back = 0;
    let most = 0;
    const done: Promise<{ digest: string }>[] = [];
    for (const f of files) {
      const d = (await stage.addDeferred(body(f), f.length)).done.then((r) => {
        back++;
        return r;
      });
      given++;
      most = Math.max(most, given - back);
      done.push(d);
    }
    const digests = await Promise.all(done);
    await stage.finish();
    expect(digests.map((d) => d.digest)).toEqual(files.map((f) => `sha256:${hex(f)}`));
    // Without the wait, the in-memory bodies queue up: nearly all 2,000 at once. (A batch of 64
    // comes back as one; its members count as back a few microtasks after they free their places.)
    expect(most).toBeLessThanOrEqual(stage.maxTasks + 64);
    expect(stage.contents.size).toBe(files.length);
  });

  it('does not compress members it is told are stored already', async () => {
    const known = randomBytes(1000);
    const k = hex(known);
    const kpool = await MemberPool.start({ dir, known: [k], threads: 1 });
    try {
      const old = { hex: k, size: 1000, length: 1000, encoding: 'raw' as const, src: { kind: 'old' as const, image: 0, pack: 3, offset: 77 } };
      const stage = new MemberStage(dir, kpool, new Map([[k, old]]), new Map());
      await (await stage.addDeferred(body(known), known.length)).done;
      await stage.finish();
      expect(stage.stats.members).toBe(0);
      expect(stage.stats.knownMembers).toBe(1);
      expect(stage.contents.get(`sha256:${k}`)!.members[0]!.src).toEqual({ kind: 'old', image: 0, pack: 3, offset: 77 });
    } finally {
      await kpool.close();
    }
  });
});
