/**
 * The read-ahead note of a pool directory (core/lazy/read-ahead-note.ts) and
 * what `gear prefetch --from-pool` says from it (convert/prefetch.ts
 * poolListNotices): a v3 list taken from a pool filled with read-ahead on
 * gets a notice naming the remedy; read-ahead off, no note, or a v2 image
 * (no packs: read-ahead never ran) get none.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { noteReadAhead, notedReadAhead, READ_AHEAD_NOTE } from '../../src/core/lazy/read-ahead-note.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import { poolListNotices } from '../../src/convert/prefetch.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-ra-note-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

const v3 = { version: 3, files: [], packs: [{ digest: `sha256:${'a'.repeat(64)}`, size: 10 }] } as unknown as IndexManifest;
const v2 = { version: 2, files: [] } as unknown as IndexManifest;

describe('read-ahead note', () => {
  it('round-trips the window, and reads no note as undefined', async () => {
    expect(await notedReadAhead(dir)).toBeUndefined();
    await noteReadAhead(dir, 128 * 1024);
    expect(await notedReadAhead(dir)).toBe(131072);
    await noteReadAhead(dir, 0);
    expect(await notedReadAhead(dir)).toBe(0);
    // Written atomically: no temporary file left beside it.
    expect(await fs.readdir(dir)).toEqual([READ_AHEAD_NOTE]);
  });

  it('a note that is not a number is no note', async () => {
    await fs.writeFile(path.join(dir, READ_AHEAD_NOTE), 'lots\n');
    expect(await notedReadAhead(dir)).toBeUndefined();
    await fs.writeFile(path.join(dir, READ_AHEAD_NOTE), `${'9'.repeat(4096)}\n`);
    expect(await notedReadAhead(dir)).toBeUndefined();
  });

  it('gear prefetch --from-pool notices a v3 list recorded with read-ahead on, and names GEAR_READ_AHEAD=0', async () => {
    await noteReadAhead(dir, 128 * 1024);
    const notices = await poolListNotices(dir, v3);
    expect(notices).toHaveLength(1);
    expect(notices[0]).toContain(dir);
    expect(notices[0]).toMatch(/read-ahead on \(128(\.0)? KiB/);
    expect(notices[0]).toContain('GEAR_READ_AHEAD=0');
    // A v2 image has no packs: read-ahead never brought anything along.
    expect(await poolListNotices(dir, v2)).toEqual([]);
  });

  it('no notice when the pool was filled without read-ahead, or says nothing', async () => {
    expect(await poolListNotices(dir, v3)).toEqual([]);
    await noteReadAhead(dir, 0);
    expect(await poolListNotices(dir, v3)).toEqual([]);
  });
});
