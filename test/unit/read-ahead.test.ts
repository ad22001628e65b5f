/** ReadAheadWindows: the per-pack read-ahead window grows while misses walk a pack forward, and only then. */
import { describe, expect, it } from 'vitest';
import { ReadAheadWindows } from '../../src/core/lazy/read-ahead.js';

const KiB = 1024;

/** Simulates a miss at offset that brought along members up to offset + covered; returns the window it used. */
function miss(w: ReadAheadWindows, pack: string, offset: number, covered?: number): number {
  const window = w.windowFor(pack, offset);
  w.used(pack, offset, offset + (covered ?? window), window);
  return window;
}

describe('ReadAheadWindows', () => {
  it('a forward walk doubles the window up to the maximum', () => {
    const w = new ReadAheadWindows({ baseBytes: 128 * KiB });
    expect(w.maxBytes).toBe(1024 * KiB);
    // A miss's directory is brought along up to 4 × base; read-ahead off turns it off too.
    expect(w.dirBytes).toBe(512 * KiB);
    expect(new ReadAheadWindows({ baseBytes: 0 }).dirBytes).toBe(0);
    expect(new ReadAheadWindows({ baseBytes: 0, dirBytes: 1 << 20 }).dirBytes).toBe(0);
    const windows: number[] = [];
    let at = 0;
    for (let i = 0; i < 8; i++) {
      const used = miss(w, 'P', at);
      windows.push(used / KiB);
      at += used + 1_000; // the next miss: just past what came along
    }
    expect(windows).toEqual([128, 256, 512, 1024, 1024, 1024, 1024, 1024]);
  });

  it('scattered misses stay at the base window; a jump back or far ahead starts over', () => {
    const w = new ReadAheadWindows({ baseBytes: 128 * KiB });
    expect(miss(w, 'P', 10_000_000)).toBe(128 * KiB);
    expect(miss(w, 'P', 2_000_000)).toBe(128 * KiB); // backwards
    expect(miss(w, 'P', 2_000_000 + 128 * KiB)).toBe(256 * KiB); // right after: growing
    expect(miss(w, 'P', 9_000_000)).toBe(128 * KiB); // far ahead
    expect(miss(w, 'P', 9_000_000)).toBe(128 * KiB); // the same place again is not progress
  });

  it('packs are independent, and only the most recently missed ones are remembered', () => {
    const w = new ReadAheadWindows({ baseBytes: 100, maxPacks: 2 });
    expect(miss(w, 'A', 0)).toBe(100);
    expect(miss(w, 'B', 0)).toBe(100);
    expect(miss(w, 'A', 150)).toBe(200);
    expect(miss(w, 'C', 0)).toBe(100); // forgets B, the least recently missed
    expect(miss(w, 'B', 150)).toBe(100);
    expect(miss(w, 'A', 400)).toBe(100); // A was forgotten when B came back (2 packs at most)
  });

  it('base 0 is off, and the maximum is never below the base', () => {
    const off = new ReadAheadWindows({ baseBytes: 0 });
    expect(miss(off, 'P', 0)).toBe(0);
    expect(miss(off, 'P', 10)).toBe(0);
    const w = new ReadAheadWindows({ baseBytes: 1000, maxBytes: 10 });
    expect(w.maxBytes).toBe(1000);
    expect(miss(w, 'P', 0)).toBe(1000);
    expect(miss(w, 'P', 1500)).toBe(1000);
  });
});
