/**
 * The conversion stage keeps each distinct content once, whether a body is
 * streamed to disk or (small, known size) hashed in memory first.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ContentStage, SMALL_BODY_BYTES } from '../../src/convert/stage.js';

const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
async function* chunks(b: Buffer, size = 7): AsyncGenerator<Buffer> {
  for (let i = 0; i < b.length; i += size) yield b.subarray(i, i + size);
}

let parent: string;
let stage: ContentStage;
beforeEach(async () => {
  parent = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-stage-'));
  stage = await ContentStage.create(parent);
});
afterEach(async () => {
  await stage.close();
  fs.rmSync(parent, { recursive: true, force: true });
});

describe('ContentStage', () => {
  it('stages 60 small bodies of 3 contents as 3 files with their digests and sizes', async () => {
    const contents = [Buffer.from('a'), Buffer.from('bb\n'), Buffer.alloc(SMALL_BODY_BYTES, 7)];
    for (let i = 0; i < 60; i++) {
      const c = contents[i % 3]!;
      expect(await stage.add(chunks(c, 4096), c.length)).toEqual({ digest: sha(c), size: c.length });
    }
    const names = fs.readdirSync(stage.dir).filter((n) => n !== '.owner').sort();
    expect(names).toEqual(contents.map((c) => sha(c).slice(7)).sort());
    for (const c of contents) expect(fs.readFileSync(stage.path(sha(c))).equals(c)).toBe(true);
  });

  it('streams a body larger than the in-memory bound, and one of unknown size, to the same place', async () => {
    const big = Buffer.alloc(SMALL_BODY_BYTES + 1, 3);
    expect(await stage.add(chunks(big, 65536), big.length)).toEqual({ digest: sha(big), size: big.length });
    const small = Buffer.from('x');
    expect(await stage.add(chunks(small))).toEqual({ digest: sha(small), size: 1 });
    expect(await stage.add(chunks(small), 1)).toEqual({ digest: sha(small), size: 1 });
    expect(fs.readdirSync(stage.dir).filter((n) => n !== '.owner').sort()).toEqual([sha(big).slice(7), sha(small).slice(7)].sort());
  });
});
