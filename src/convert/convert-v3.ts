/**
 * gear convert, format version 3 (docs/format.md §10.3).
 */
import { tmpdir } from 'node:os';
import type { PackRef } from '../core/index/manifest.js';
import type { Destination } from './destination.js';
import { flattenLayers, Flattener } from './flatten.js';
import { mapLimit } from './map-limit.js';
import { MemberPool } from './member-pool.js';
import { MemberStage, type StagedContent, type StagedMember } from './member-stage.js';
import { EarlyPacker } from './early-packs.js';
import { adoptStagedPacks, placePacks, stagedPackMembers, type StagedPack } from './packs.js';
import { publishConversion } from './publish.js';
import { bringPack, reusableMembers, type PackTransfer } from './reuse.js';
import { claimScratch } from './scratch.js';
import type { SourceImage } from './source.js';
import type { ConvertOptions, ConvertSummary } from './types.js';
import { UploadTally } from './upload-tally.js';

/**
 * Format version 3 (docs/format.md §10.3): flatten with hashing and zstd in
 * worker threads (MemberStage), cut the new members into packs as they come
 * and upload each full pack at once, a few in flight (early-packs.ts,
 * packs.ts), reference contents stored in packs of the
 * images given for reuse and bring those packs into the destination
 * (reuse.ts), then publish as every version does.
 */
export async function convertV3(src: SourceImage, dst: Destination, opts: ConvertOptions, t0: bigint): Promise<ConvertSummary> {
  const progress = opts.progress ?? (() => undefined);
  const reuse = opts.reuse ?? [];
  const key = /^sha256:[a-f0-9]{64}$/.test(src.sourceDigest) ? src.sourceDigest.slice(7) : undefined;
  const scratch = await claimScratch(opts.tmpDir ?? tmpdir(), 'gear-convert-', key);
  let pool: MemberPool | undefined;
  let packer: EarlyPacker | undefined;
  try {
    const dir = scratch.dir;
    const staged: Map<string, StagedPack> = scratch.reused ? await adoptStagedPacks(dir) : new Map();
    const old = reusableMembers(reuse);
    // Reusable members: old packs first (no upload at all), then what a killed run left staged.
    const known = new Map<string, StagedMember>(old.members);
    for (const [hex, m] of stagedPackMembers(staged.values())) if (!known.has(hex)) known.set(hex, m);
    pool = await MemberPool.start({ dir, known: known.keys(), compress: opts.storage !== 'raw', ...(opts.threads ? { threads: opts.threads } : {}) });
    const stage = new MemberStage(dir, pool, known, old.contents);
    const tally = new UploadTally(progress);
    const account = tally.account;

    // 1. flatten; bodies hashed and compressed by the workers as they stream out of the layers, and the new
    // members cut into packs in that order, each pack uploaded as soon as it is full (early-packs.ts)
    packer = new EarlyPacker(stage, {
      dir,
      dst,
      concurrency: opts.concurrency ?? 4,
      staged,
      progress: (e) => {
        account(e.digest, e.size, e.status);
        progress(e);
      },
    });
    const early = packer;
    stage.onContent = (done) => early.add(done);
    const flat = new Flattener(stage);
    await flattenLayers(flat, src.layers, progress);
    const written = await packer.finish();
    await stage.finish();
    await pool.close();
    pool = undefined;
    const { entries, manifest: m } = flat.result(dst.location);
    const manifest = m;
    manifest.version = 3;

    // 2. the index's packs: the new ones; reused ones referenced, indexed after the new ones in first-use order
    const oldIndex = new Map<string, number>();
    const oldList: { image: number; ref: PackRef }[] = [];
    const contents = stage.contents as Map<string, StagedContent>;
    const { unlisted } = placePacks(manifest, contents, written, {
      index: (image, pack) => {
        const ref = reuse[image]!.manifest.packs![pack]!;
        const k = ref.digest;
        let i = oldIndex.get(k);
        if (i === undefined) {
          i = oldList.length;
          oldIndex.set(k, i);
          oldList.push({ image, ref });
        }
        return i;
      },
      list: () => oldList.map((o) => o.ref),
    });
    const stats = written.stats;
    const notices: string[] = [];
    if (unlisted.packs > 0) {
      notices.push(
        `${unlisted.packs} pack(s) (${(unlisted.bytes / 1e6).toFixed(1)} MB) uploaded while the layers were read hold only files a later layer removed or replaced; the index does not list them and a registry garbage collection reclaims them`,
      );
    }
    // A pack that is both new and old (the same bytes): listed once is what the format asks; it cannot
    // happen (a reused member is never written again), so only check.
    if (new Set(manifest.packs!.map((p) => p.digest)).size !== manifest.packs!.length) throw new Error('internal: a pack is listed twice');
    const transfers: Record<PackTransfer, number> = { present: 0, mounted: 0, copied: 0 };
    let n = 0;
    await mapLimit(oldList, opts.concurrency ?? 4, async (o) => {
      const t = await bringPack(dst, reuse[o.image]!, o.ref, dir, `old-pack-${n++}`);
      transfers[t]++;
      progress({ kind: 'pack', digest: o.ref.digest, size: o.ref.size, status: t });
    });
    let reusedFiles = 0;
    const reusedContents = new Map<string, number>();
    for (const f of manifest.files) {
      const c = contents.get(f.digest)!;
      if (c.members.every((x) => x.src.kind === 'old')) {
        reusedFiles++;
        reusedContents.set(f.digest, f.size);
      }
    }
    let logicalBytes = 0;
    for (const f of manifest.files) logicalBytes += f.size;

    // 3-5. index layer, config, keep-alive manifests (of the packs), the image manifest last
    const published = await publishConversion(src, dst, manifest, entries, { tmpDir: dir, filesPerManifest: opts.filesPerManifest, attach: opts.attach, account, progress });
    return {
      ...published,
      files: manifest.files.length,
      uniqueContents: contents.size,
      logicalBytes,
      layerBytes: flat.stats.layerBytes,
      ...tally.totals(),
      resumedContents: 0,
      resumedGzip: 0,
      seconds: Number(process.hrtime.bigint() - t0) / 1e9,
      reusedFiles,
      reusedBytes: [...reusedContents.values()].reduce((a, b) => a + b, 0),
      v3: {
        packs: manifest.packs!.length,
        packBytes: manifest.packs!.reduce((s, p) => s + p.size, 0),
        newPacks: manifest.packs!.length - oldList.length,
        newPackBytes: manifest.packs!.slice(0, manifest.packs!.length - oldList.length).reduce((t, p) => t + p.size, 0),
        packsUploaded: stats.packsUploaded,
        packBytesUploaded: stats.packBytesUploaded,
        packsResumed: stats.packsResumed,
        reusedFiles,
        reusedBytes: [...reusedContents.values()].reduce((a, b) => a + b, 0),
        reusedPacks: oldList.length,
        packsPresent: transfers.present,
        packsMounted: transfers.mounted,
        packsCopied: transfers.copied,
        compressedMembers: stage.stats.members,
        memberBytesIn: stage.stats.bytesIn,
        memberBytesStored: stage.stats.bytesStored,
        notices,
      },
    };
  } finally {
    await packer?.settle(); // no pack still writing into the staging directory when it goes
    await pool?.close().catch(() => undefined);
    await scratch.release();
  }
}
