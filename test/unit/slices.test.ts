/**
 * Builds in slices (src/core/layers/slices.ts) and the sliced index builds:
 * the same results as the synchronous ones, and the event loop runs between
 * slices (what keeps the prefetch downloads going while a pull builds its index).
 */
import { describe, expect, it } from 'vitest';
import { runSliced, runSync, type Steps } from '../../src/core/layers/slices.js';
import { buildErofsImage, buildErofsImageSliced, type ErofsNode } from '../../src/core/layers/erofs-image.js';
import { indexTreeFromEntries, indexTreeFromEntriesSliced } from '../../src/core/layers/index-image.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { indexTarHeader as hdr } from './fixtures/tarbuild.js';

function* counted(log: string[], n: number): Steps<number> {
  for (let i = 0; i < n; i++) {
    log.push(`step ${i}`);
    yield;
  }
  return n;
}

/** A setImmediate chain that records each turn of the event loop until stopped. */
function turns(log: string[]): () => void {
  let on = true;
  const tick = () => {
    if (!on) return;
    log.push('turn');
    setImmediate(tick);
  };
  setImmediate(tick);
  return () => {
    on = false;
  };
}

function bigIndex(n: number): { manifest: IndexManifest; entries: TarHeader[] } {
  const entries: TarHeader[] = [];
  const files: IndexManifest['files'] = [];
  for (let d = 0; d < n / 100; d++) {
    const dir = `d${String(d).padStart(4, '0')}`;
    entries.push(hdr(dir, 'dir', { mode: 0o750 }));
    for (let i = 0; i < 100; i++) {
      const p = `${dir}/f${String(i).padStart(3, '0')}`;
      entries.push(hdr(p, 'file', { mode: 0o644, uid: d, gid: i }));
      files.push({ path: p, digest: `sha256:${(d * 100 + i).toString(16).padStart(64, '0')}`, size: d * 100 + i + 1 });
    }
  }
  return { manifest: { version: 2, files }, entries };
}

describe('builds in slices', () => {
  it('runSync runs every step at once; runSliced returns the same and lets the event loop run between slices', async () => {
    const a: string[] = [];
    const stopA = turns(a);
    expect(runSync(counted(a, 3))).toBe(3);
    stopA();
    expect(a).toEqual(['step 0', 'step 1', 'step 2']);

    const b: string[] = [];
    const stopB = turns(b);
    expect(await runSliced(counted(b, 3), 0)).toBe(3);
    stopB();
    // With a 0 ms slice every yield is a turn of the loop: other callbacks ran between the steps.
    expect(b.slice(0, 6)).toEqual(['step 0', 'turn', 'step 1', 'turn', 'step 2', 'turn']);
  });

  it('an error thrown in a step rejects runSliced', async () => {
    function* failing(): Steps<number> {
      yield;
      throw new Error('bad entry');
    }
    await expect(runSliced(failing(), 0)).rejects.toThrow('bad entry');
  });

  it('the sliced index tree and EROFS image equal the synchronous ones, and the loop ran meanwhile', async () => {
    const { manifest, entries } = bigIndex(20_000);
    const log: string[] = [];
    const stop = turns(log);
    const sliced = await indexTreeFromEntriesSliced(manifest, entries);
    const img = await buildErofsImageSliced(sliced.root, 1_700_000_000);
    stop();
    // 20,000 entries take well over one 8 ms slice here: the loop got turns.
    expect(log.length).toBeGreaterThan(1);
    const sync = indexTreeFromEntries(manifest, entries);
    // The root's mtime is the build time: give both the same before comparing.
    (sync.root as ErofsNode).mtimeSec = sliced.root.mtimeSec;
    (sync.root as ErofsNode).mtimeNsec = sliced.root.mtimeNsec;
    expect(sliced.result).toEqual(sync.result);
    expect(img.equals(buildErofsImage(sync.root, 1_700_000_000))).toBe(true);
  });
});
