/**
 * Early packs (src/convert/early-packs.ts, packs.ts placePacks): the packs of
 * a conversion are cut in the order the layers gave the contents, whatever
 * order the workers return them in, written into an OCI layout destination
 * as each fills; the index lists only packs a file of the final tree uses.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ociLayoutDestination } from '../../src/convert/destination.js';
import { EarlyPacker } from '../../src/convert/early-packs.js';
import type { MemberStage, StagedContent, StagedMember } from '../../src/convert/member-stage.js';
import { layoutPacks } from '../../src/convert/pack-plan.js';
import { placePacks } from '../../src/convert/packs.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
let dir: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'gear-early-packs-'));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** Contents of the given stored lengths, their bytes in one spool file; chunked when given several lengths. */
function stage(lengths: number[][]): { contents: Map<string, StagedContent>; order: string[]; bytes: Map<StagedMember, Buffer>; stage: MemberStage } {
  const spool = join(dir, 'spool');
  const parts: Buffer[] = [];
  let at = 0;
  const contents = new Map<string, StagedContent>();
  const order: string[] = [];
  const bytes = new Map<StagedMember, Buffer>();
  for (const ls of lengths) {
    const members = ls.map((length) => {
      const b = randomBytes(length);
      parts.push(b);
      const m: StagedMember = { hex: sha(b), size: length, length, encoding: 'raw', src: { kind: 'local', file: spool, offset: at } };
      at += length;
      bytes.set(m, b);
      return m;
    });
    const digest = `sha256:${sha(Buffer.concat(members.map((m) => bytes.get(m)!)))}`;
    contents.set(digest, { digest, size: at, members, ...(ls.length > 1 ? { chunkSize: ls[0] } : {}) });
    order.push(digest);
  }
  writeFileSync(spool, Buffer.concat(parts));
  let flushes = 0;
  const s = { contents, flushed: async () => void flushes++ } as unknown as MemberStage;
  return { contents, order, bytes, stage: s };
}

describe('early packs', () => {
  it('cuts packs in the order the contents were given, not the order they came back, and uploads each', async () => {
    const lengths = [[10], [50], [45], [30, 30, 30, 30], [100], [150], [5]];
    const { contents, order, bytes, stage: s } = stage(lengths);
    const dst = await ociLayoutDestination(`${join(dir, 'out')}:t`);
    const events: string[] = [];
    const packer = new EarlyPacker(s, { dir, dst, concurrency: 2, staged: new Map(), maxPackBytes: 100, progress: (e) => events.push(e.digest) });
    // The workers answer in reverse: the last content given is back first.
    const resolvers: (() => void)[] = [];
    for (const d of order) packer.add(new Promise((r) => resolvers.push(() => r({ digest: d }))));
    for (const r of resolvers.reverse()) {
      r();
      await new Promise((t) => setImmediate(t));
    }
    const written = await packer.finish();
    const expected = layoutPacks(order.map((d) => ({ digest: d, members: contents.get(d)!.members })), 100);
    expect(written.plan.map((p) => p.members.map((x) => [x.member.hex, x.offset]))).toEqual(expected.map((p) => p.members.map((x) => [x.member.hex, x.offset])));
    expect(written.refs).toHaveLength(expected.length);
    // Each pack in the destination is its members' bytes in plan order.
    written.plan.forEach((p, i) => {
      const blob = readFileSync(join(dir, 'out', 'blobs', 'sha256', written.refs[i]!.digest.slice(7)));
      expect(blob.equals(Buffer.concat(p.members.map((x) => bytes.get(x.member)!)))).toBe(true);
    });
    expect(events.sort()).toEqual(written.refs.map((r) => r.digest).sort());
    expect(written.stats.packsUploaded).toBe(expected.length);
  });

  it('the index leaves out a pack whose files are all gone from the final tree and renumbers the others', async () => {
    // Pack 0: a + b (b removed by a later layer); pack 1: c alone (removed); pack 2: d.
    const { contents, order, stage: s } = stage([[40], [50], [90], [30]]);
    const dst = await ociLayoutDestination(`${join(dir, 'out')}:t`);
    const packer = new EarlyPacker(s, { dir, dst, concurrency: 4, staged: new Map(), maxPackBytes: 100 });
    for (const d of order) packer.add(Promise.resolve({ digest: d }));
    const written = await packer.finish();
    expect(written.plan).toHaveLength(3);
    const [a, , , d] = order;
    const manifest = { version: 3, files: [{ path: 'a', digest: a!, size: 40 }, { path: 'd', digest: d!, size: 30 }] } as unknown as IndexManifest;
    const { unlisted } = placePacks(manifest, contents, written, { index: () => 0, list: () => [] });
    expect(unlisted).toEqual({ packs: 1, bytes: written.refs[1]!.size });
    expect(manifest.packs).toEqual([written.refs[0], written.refs[2]]);
    const files = manifest.files as unknown as { member: { pack: number; offset: number } }[];
    expect(files[0]!.member).toMatchObject({ pack: 0, offset: 0 });
    expect(files[1]!.member).toMatchObject({ pack: 1, offset: 0 });
  });

  it('an upload that fails fails the conversion at finish, after every write settled', async () => {
    const { order, stage: s } = stage([[60], [60], [60]]);
    const dst = await ociLayoutDestination(`${join(dir, 'out')}:t`);
    let calls = 0;
    const failing = { ...dst, pushBytes: async (digest: string, b: Buffer) => (++calls === 2 ? Promise.reject(new Error('registry said no')) : dst.pushBytes(digest, b)) };
    const packer = new EarlyPacker(s, { dir, dst: failing, concurrency: 1, staged: new Map(), maxPackBytes: 100 });
    for (const d of order) packer.add(Promise.resolve({ digest: d }));
    await expect(packer.finish()).rejects.toThrow(/registry said no/);
    await packer.settle();
  });
});
