/**
 * The pool's references: which contents each owner (an index layer) needs,
 * in memory and as one record per owner under `.meta/refs/` (pool.ts). A
 * content with at least one owner is "referenced" and evicted only after
 * every unreferenced one. Records are written atomically, one queue per
 * owner, so that calls for one owner land in order.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { errnoCode } from '../errors.js';
import type { Logger } from '../log.js';
import { readJson, syncDir, writeFileAtomic } from '../sys/fsutil.js';
import { KeyedMutex } from '../sys/keyed-mutex.js';
import type { RefsRecord } from './types.js';

export class PoolReferences {
  /** Owner → the hex digests it references. */
  private readonly byOwner = new Map<string, Set<string>>();
  /** Hex digest → how many owners reference it. */
  private readonly counts = new Map<string, number>();
  private readonly mutex = new KeyedMutex();

  constructor(
    readonly dir: string,
    private readonly log: Logger,
  ) {}

  /** Reads the records (at open); unreadable ones are skipped, temps of interrupted writes removed unless read-only. */
  async load(readOnly: boolean, hexOf: (digest: string) => string): Promise<void> {
    let names: string[];
    try {
      names = await fs.readdir(this.dir);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return;
      throw err;
    }
    for (const name of names) {
      const file = path.join(this.dir, name);
      if (!name.endsWith('.json')) {
        if (!readOnly) await fs.rm(file, { force: true }); // temp of an interrupted write
        continue;
      }
      try {
        const rec = await readJson<RefsRecord>(file);
        if (!rec || typeof rec.owner !== 'string' || !Array.isArray(rec.digests)) throw new Error('bad shape');
        this.apply(rec.owner, rec.digests.map(hexOf));
      } catch (err) {
        this.log.warn({ file, err: String(err) }, 'pool: ignoring unreadable reference record');
      }
    }
  }

  /** Replaces owner's set in memory at once; the promise resolves when its record is durable. */
  set(owner: string, hexes: string[]): Promise<void> {
    this.apply(owner, hexes);
    return this.mutex.run(owner, async () => {
      const rec: RefsRecord = { owner, digests: hexes.map((h) => `sha256:${h}`) };
      await writeFileAtomic(this.fileOf(owner), JSON.stringify(rec) + '\n', 0o600);
    });
  }

  /** Forgets owner in memory at once; the promise resolves when its record is gone for good. */
  drop(owner: string): Promise<void> {
    this.apply(owner, []);
    return this.mutex.run(owner, async () => {
      await fs.rm(this.fileOf(owner), { force: true });
      await syncDir(this.dir);
    });
  }

  /** True when some owner references the hex digest. */
  has(hex: string): boolean {
    return (this.counts.get(hex) ?? 0) > 0;
  }

  /** The hex digests owner references (empty when unknown). */
  of(owner: string): ReadonlySet<string> {
    return this.byOwner.get(owner) ?? new Set();
  }

  owners(): string[] {
    return [...this.byOwner.keys()];
  }

  get size(): number {
    return this.byOwner.size;
  }

  private fileOf(owner: string): string {
    return path.join(this.dir, createHash('sha256').update(owner).digest('hex').slice(0, 40) + '.json');
  }

  private apply(owner: string, hexes: string[]): void {
    const old = this.byOwner.get(owner);
    if (old) {
      for (const h of old) {
        const n = (this.counts.get(h) ?? 1) - 1;
        if (n > 0) this.counts.set(h, n);
        else this.counts.delete(h);
      }
    }
    if (hexes.length === 0) {
      this.byOwner.delete(owner);
      return;
    }
    this.byOwner.set(owner, new Set(hexes));
    for (const h of hexes) this.counts.set(h, (this.counts.get(h) ?? 0) + 1);
  }
}
