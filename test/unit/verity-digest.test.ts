/**
 * The fs-verity file digest computed in TS (src/core/pool/verity-digest.ts)
 * against fsverity-utils' `fsverity digest` (Debian package fsverity), which
 * computes it in user space (no kernel support needed). Skipped when the tool
 * is not installed.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FsverityHasher, fsverityDigest } from '../../src/core/pool/verity-digest.js';

const TOOL = '/usr/bin/fsverity';
let dir: string;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-verity-digest-'));
});
afterAll(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

function toolDigest(file: string): string {
  // "sha256:<hex> <file>"
  return execFileSync(TOOL, ['digest', '--hash-alg=sha256', '--block-size=4096', file], { encoding: 'utf8' }).split(' ')[0]!;
}

describe('fs-verity digest', () => {
  const sizes = [0, 1, 4095, 4096, 4097, 8192, 128 * 4096, 128 * 4096 + 1, 300_001];
  // The reference is fsverity-utils (scripts/install-deps.sh installs it).
  it.each(sizes)('matches `fsverity digest` for %i bytes', async (size) => {
    const body = randomBytes(size);
    const file = path.join(dir, `f${size}`);
    await fs.writeFile(file, body);
    const expected = toolDigest(file);
    expect(expected).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(await fsverityDigest(body)).toBe(expected);
    // Streamed in odd chunks: the same.
    const chunks: Buffer[] = [];
    for (let off = 0; off < size; off += 1000 + (off % 7)) chunks.push(body.subarray(off, off + 1000 + (off % 7)));
    expect(await fsverityDigest(Readable.from(chunks))).toBe(expected);
  });

  it('matches for a three-level tree (more than 128 × 128 blocks)', async () => {
    const size = 128 * 128 * 4096 + 12_345;
    const body = Buffer.alloc(size, 0x5a);
    const file = path.join(dir, 'big');
    await fs.writeFile(file, body);
    expect(await fsverityDigest(body)).toBe(toolDigest(file));
  });

  it('differs from the sha256 of the content and from a one-byte change', async () => {
    const a = Buffer.alloc(10_000, 1);
    const b = Buffer.from(a);
    b[9_999] = 2;
    expect(await fsverityDigest(a)).not.toBe(await fsverityDigest(b));
    expect(new FsverityHasher().rootHash().equals(Buffer.alloc(32))).toBe(true);
    const h = new FsverityHasher().update(a);
    h.digest();
    expect(() => h.update(a)).toThrow(/after digest/);
  });
});
