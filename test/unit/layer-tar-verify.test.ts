/**
 * layerTar (src/convert/source.ts): the bytes a conversion reads of a source
 * layer are verified against the blob digest and the diff_id. An uncompressed
 * blob (digest = diff_id, as `docker save` writes) is hashed once and must not
 * be compressed; a compressed blob is checked on both sides.
 */
import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { layerTar, type SourceLayer } from '../../src/convert/source.js';

const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
/** Any bytes that are not gzip or zstd stand for a tar here: layerTar does not parse them. */
const TAR = Buffer.concat([Buffer.from('etc/hostname'), Buffer.alloc(3 * 1024 * 1024, 7)]);

function layer(blob: Buffer, l: { digest?: string; diffId: string; size?: number }): SourceLayer {
  return {
    name: 'layer 1/1 (test)',
    ...l,
    open: async () =>
      (async function* () {
        for (let i = 0; i < blob.length; i += 100_000) yield blob.subarray(i, i + 100_000);
      })(),
  } as SourceLayer;
}

async function read(l: SourceLayer): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const c of layerTar(l)) out.push(c);
  return Buffer.concat(out);
}

describe('layerTar verification', () => {
  it('an uncompressed blob whose digest is its diff_id passes through whole', async () => {
    expect((await read(layer(TAR, { digest: sha(TAR), diffId: sha(TAR), size: TAR.length }))).equals(TAR)).toBe(true);
  });

  it('a changed byte of an uncompressed blob is refused', async () => {
    const bad = Buffer.from(TAR);
    bad[2_000_000] ^= 1;
    await expect(read(layer(bad, { digest: sha(TAR), diffId: sha(TAR), size: TAR.length }))).rejects.toThrow(/blob: content does not match its digest/);
  });

  it('a truncated uncompressed blob is refused', async () => {
    await expect(read(layer(TAR.subarray(0, 1_000_000), { digest: sha(TAR), diffId: sha(TAR), size: TAR.length }))).rejects.toThrow(/truncated/);
  });

  it('a gzip blob whose config names the blob digest as diff_id is refused as compressed', async () => {
    const gz = gzipSync(TAR);
    await expect(read(layer(gz, { digest: sha(gz), diffId: sha(gz), size: gz.length }))).rejects.toThrow(/blob must be an uncompressed tar, but it is compressed \(gzip\)/);
  });

  it('a gzip blob is checked against its digest and its content against the diff_id', async () => {
    const gz = gzipSync(TAR);
    expect((await read(layer(gz, { digest: sha(gz), diffId: sha(TAR), size: gz.length }))).equals(TAR)).toBe(true);
    await expect(read(layer(gz, { digest: sha(gz), diffId: sha(Buffer.from('other')), size: gz.length }))).rejects.toThrow(/diff_id\): content does not match/);
  });

  it('a layer without a blob digest (an old docker save) is checked against its diff_id', async () => {
    expect((await read(layer(TAR, { diffId: sha(TAR) }))).equals(TAR)).toBe(true);
    const bad = Buffer.from(TAR);
    bad[5] ^= 1;
    await expect(read(layer(bad, { diffId: sha(TAR) }))).rejects.toThrow(/diff_id\): content does not match/);
  });
});
