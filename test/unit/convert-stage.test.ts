/**
 * The conversion stage's scratch directory (src/convert/scratch.ts, stage.ts):
 * reused only when a dead run of the same source left it and nobody else
 * could have written into it; never shared with a live run.
 */
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ContentStage } from '../../src/convert/stage.js';

const KEY = 'ab'.repeat(32);
let parent: string;
const deadPid = () => spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout.toString().trim();
async function* bytes(s: string) {
  yield Buffer.from(s);
}

beforeEach(() => {
  parent = mkdtempSync(path.join(os.tmpdir(), 'gear-stage-unit-'));
});
afterEach(() => {
  rmSync(parent, { recursive: true, force: true });
});

describe('conversion stage', () => {
  it('takes over a dead run\'s stage of the same source and reuses its complete contents; close removes it', async () => {
    const first = await ContentStage.create(parent, KEY);
    expect(first.reused).toBe(false);
    const { digest } = await first.add(bytes('hello'));
    await first.gzip(digest, 6);
    writeFileSync(path.join(first.dir, `tmp-1-0`), 'partial');
    writeFileSync(path.join(first.dir, '.owner'), `${deadPid()}\n`); // as if killed -9
    const second = await ContentStage.create(parent, KEY);
    expect(second.dir).toBe(first.dir);
    expect(second.reused).toBe(true);
    expect(existsSync(path.join(second.dir, 'tmp-1-0'))).toBe(false);
    await second.add(bytes('hello'));
    expect(second.reusedContents).toBe(1);
    const gz = await second.gzip(digest, 6);
    expect(second.reusedGzip).toBe(1);
    expect(gz.size).toBeGreaterThan(0);
    await second.close();
    expect(readdirSync(parent)).toEqual([]);
  });

  it('does not share the stage of a live run, nor reuse one others could write into', async () => {
    const live = await ContentStage.create(parent, KEY);
    const other = await ContentStage.create(parent, KEY);
    expect(other.dir).not.toBe(live.dir);
    expect(other.reused).toBe(false);
    await other.close();
    await live.close();

    const planted = path.join(parent, `gear-convert-${KEY}`);
    mkdirSync(planted);
    chmodSync(planted, 0o777);
    writeFileSync(path.join(planted, '.owner'), `${deadPid()}\n`);
    writeFileSync(path.join(planted, 'cd'.repeat(32)), 'planted');
    const s = await ContentStage.create(parent, KEY);
    expect(s.dir).not.toBe(planted);
    expect(s.reused).toBe(false);
    expect(s.has(`sha256:${'cd'.repeat(32)}`)).toBe(false);
    await s.close();
    expect(existsSync(planted)).toBe(true); // not ours to remove
  });
});
