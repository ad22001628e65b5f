/**
 * Early packs: a format v3 conversion cuts its new members into packs in the
 * order the layers bring the files (each layer's tar order, lower layers
 * first) and writes and uploads each pack as soon as it is full, while the
 * layers are still being read: the uploads overlap the flattening instead of
 * following it (docs/format.md §10.3, §10.5).
 *
 * The order is fixed by the tar, not by the workers: contents are placed in
 * the order MemberStage was given them, each once its members are back, so a
 * rerun of a killed conversion cuts the same packs and takes the complete
 * ones from the staging directory (packs.ts). A file that a later layer
 * removes or replaces has been packed by then; placePacks leaves a pack
 * holding nothing else out of the index.
 *
 *   const packer = new EarlyPacker(stage, opts);  stage.onContent = (d) => packer.add(d);
 *   … flatten …
 *   const written = await packer.finish();        // or, on an error: await packer.settle()
 */
import type { FileHandle } from 'node:fs/promises';
import type { PackRef } from '../core/index/manifest.js';
import { Semaphore } from '../core/semaphore.js';
import type { MemberStage, StagedMember } from './member-stage.js';
import { PackCutter, PACK_MAX_BYTES, type PlannedPack } from './pack-plan.js';
import { noPackStats, writePack, type PackStats, type WritePacksOptions, type WrittenPacks } from './packs.js';

export class EarlyPacker {
  private readonly placed = new Set<string>();
  private chain: Promise<void> = Promise.resolve();
  private readonly cutter: PackCutter<StagedMember>;
  private readonly plan: PlannedPack<StagedMember>[] = [];
  private readonly writes: Promise<PackRef>[] = [];
  private readonly handles = new Map<string, Promise<FileHandle>>();
  private readonly stats: PackStats = noPackStats();
  private readonly uploads: Semaphore;
  private failed: unknown;

  constructor(
    private readonly stage: MemberStage,
    private readonly opts: WritePacksOptions,
  ) {
    this.cutter = new PackCutter((p) => this.write(p), opts.maxPackBytes ?? PACK_MAX_BYTES);
    this.uploads = new Semaphore(Math.max(1, opts.concurrency));
  }

  /** The next content of the layers (MemberStage.onContent): placed once it and every earlier one are back. */
  add(done: Promise<{ digest: string }>): void {
    this.chain = this.chain.then(async () => {
      if (this.failed !== undefined) return;
      try {
        this.place((await done).digest);
      } catch (err) {
        this.failed ??= err; // the flattener reports it; nothing after it is placed
      }
    });
  }

  private place(digest: string): void {
    if (this.placed.has(digest)) return;
    this.placed.add(digest);
    const c = this.stage.contents.get(digest);
    if (!c) throw new Error(`internal: content ${digest} came back but was not staged`);
    this.cutter.add(c.members.filter((m) => m.src.kind === 'local'));
  }

  /** A full pack: written and uploaded, at most `concurrency` at once, its members' spool bytes on disk first. */
  private write(p: PlannedPack<StagedMember>): void {
    this.plan.push(p);
    const w = (async () => {
      const release = await this.uploads.acquire();
      try {
        await this.stage.flushed();
        return await writePack(p, this.opts, this.handles, this.stats);
      } finally {
        release();
      }
    })();
    w.catch((err: unknown) => {
      this.failed ??= err;
    });
    this.writes.push(w);
  }

  /** Places what is still coming, writes the last pack and waits for every upload; the packs in order. */
  async finish(): Promise<WrittenPacks> {
    await this.chain;
    if (this.failed === undefined) this.cutter.close();
    await this.settle();
    if (this.failed !== undefined) throw this.failed;
    return { plan: this.plan, refs: await Promise.all(this.writes), stats: this.stats };
  }

  /** Waits until nothing of the packer runs any more (after an error elsewhere, before the staging goes). */
  async settle(): Promise<void> {
    await this.chain;
    await Promise.allSettled(this.writes);
    for (const h of this.handles.values()) await h.then((f) => f.close()).catch(() => undefined);
    this.handles.clear();
  }
}
