/**
 * The warm-up of the index code (src/core/layers/warm-up.ts): its synthetic
 * index is a valid version 3 index layer that goes through every step of an
 * ApplyDiff's build, and an abort stops it.
 */
import { describe, expect, it } from 'vitest';
import { readIndexLayer, writeIndexLayer } from '../../src/core/index/index-layer.js';
import { indexTreeFromEntries } from '../../src/core/layers/index-image.js';
import { syntheticIndex, warmUpIndexCode, WARM_UP_FILES } from '../../src/core/layers/warm-up.js';

async function roundTrip(n: number) {
  const { manifest, entries } = syntheticIndex(n);
  const tar: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, entries)) tar.push(c);
  return readIndexLayer(
    (async function* () {
      yield* tar;
    })(),
  );
}

describe('index code warm-up', () => {
  it('its synthetic index is a valid v3 index layer: packed files, a chunked file, symlinks, a prefetch list', async () => {
    const layer = await roundTrip(300);
    expect(layer.manifest.version).toBe(3);
    expect(layer.manifest.files).toHaveLength(301);
    expect(layer.manifest.files.filter((f) => f.chunks)).toHaveLength(1);
    expect(layer.manifest.files.filter((f) => f.member).length).toBe(300);
    expect(new Set(layer.manifest.files.map((f) => f.member?.pack)).size).toBeGreaterThan(1);
    expect(layer.entries.filter((h) => h.type === 'symlink').length).toBeGreaterThan(0);
    expect(layer.manifest.prefetch!.length).toBeGreaterThan(0);
    const { result } = indexTreeFromEntries(layer.manifest, layer.entries);
    expect(result.files).toBe(301);
  });

  it('runs the whole build and says how long it took; an aborted warm-up stops before the tree', async () => {
    const ms = await warmUpIndexCode(undefined, 500);
    expect(ms).toBeGreaterThan(0);
    const ac = new AbortController();
    ac.abort();
    expect(await warmUpIndexCode(ac.signal, 500)).toBeUndefined();
    expect(WARM_UP_FILES).toBeGreaterThanOrEqual(1000);
  });
});
