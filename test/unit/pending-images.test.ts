/**
 * Index images written after ApplyDiff returned (src/core/layers/pending-images.ts):
 * a Get waits for them, a failed write is reported to every Get above it
 * until the layer is removed, and nothing waits on a layer that has none.
 */
import { describe, expect, it } from 'vitest';
import { PendingImages } from '../../src/core/layers/pending-images.js';

const later = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

describe('pending index images', () => {
  it('ready() waits for the write of the layers asked for, and only those', async () => {
    const p = new PendingImages(undefined);
    let written = false;
    p.start('a', async () => {
      await later(50);
      written = true;
    });
    await p.ready(['other']);
    expect(written).toBe(false);
    await p.ready(['x', 'a']);
    expect(written).toBe(true);
  });

  it('a failed write fails every ready() with the cause and the remedy, until settle() forgets it', async () => {
    const p = new PendingImages(undefined);
    p.start('a', async () => {
      throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' });
    });
    await expect(p.ready(['a'])).rejects.toThrow(/layer a: its index image could not be written \(.*no space left on device.*\); restart the daemon to rebuild it/);
    await expect(p.ready(['a'])).rejects.toThrow(/could not be written/);
    await p.settle('a');
    await expect(p.ready(['a'])).resolves.toBeUndefined();
  });

  it('settleAll() waits for every write, failed or not', async () => {
    const p = new PendingImages(undefined);
    const done: string[] = [];
    p.start('a', async () => {
      await later(30);
      done.push('a');
    });
    p.start('b', async () => {
      await later(10);
      done.push('b');
      throw new Error('boom');
    });
    await p.settleAll();
    expect(done.sort()).toEqual(['a', 'b']);
  });
});
