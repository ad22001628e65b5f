/**
 * The background fetches of index layers, for the layer store: the prefetch
 * an index lists (prefetch.ts), kept from the index's reading until the
 * layer is recorded, and, with background fetch on, the completion of the
 * whole image (completion.ts), which starts once that prefetch has ended.
 * Removing a layer stops both.
 */
import type { Logger } from '../log.js';
import type { GearBlobTuple } from './catalog.js';
import { ImageCompletion } from './completion.js';
import { Prefetcher } from './prefetch.js';
import type { LazyRuntime } from './runtime.js';

type Files = Array<{ digest: string; size: number }>;

export class LayerFetches {
  readonly prefetcher: Prefetcher;
  /** Present when background fetch is on. */
  readonly completion: ImageCompletion | undefined;
  /** Files an index layer being applied lists for prefetch, until its record is written. */
  private readonly pending = new Map<string, Files>();

  constructor(lazy: Pick<LazyRuntime, 'pool' | 'fetcher' | 'catalog' | 'backgroundFetch'>, logger?: Logger) {
    const deps = { pool: lazy.pool, fetcher: lazy.fetcher, catalog: lazy.catalog, ...(logger ? { logger } : {}) };
    this.prefetcher = new Prefetcher(deps);
    this.completion = lazy.backgroundFetch ? new ImageCompletion(deps) : undefined;
  }

  /** An index layer is being applied: what its index lists for prefetch (replaces an earlier plan). */
  plan(id: string, prefetch: Files): void {
    this.pending.delete(id);
    if (prefetch.length) this.pending.set(id, prefetch);
  }

  /** The layer is recorded: its prefetch starts (after the caller answers), then its completion. */
  recorded(id: string, blobs: readonly GearBlobTuple[] | undefined): void {
    const files = this.pending.get(id);
    this.pending.delete(id);
    if (files) this.prefetcher.begin(id, files);
    if (this.completion && blobs) this.completion.begin(id, filesOf(blobs), this.prefetcher.done(id));
  }

  /** Index layers present at start (background fetch on): complete them too. */
  present(layers: Iterable<{ id: string; blobs: readonly GearBlobTuple[] }>): void {
    if (!this.completion) return;
    for (const l of layers) this.completion.begin(l.id, filesOf(l.blobs));
  }

  stop(id: string): void {
    this.pending.delete(id);
    this.prefetcher.stop(id);
    this.completion?.stop(id);
  }

  /** The daemon status lines (`docker info`). */
  status(): Array<[string, string]> {
    return [
      ['Prefetch', this.prefetcher.status()],
      ['Background Fetch', this.completion ? this.completion.status() : 'off (only opened files are fetched; --background-fetch)'],
    ];
  }

  async close(): Promise<void> {
    await this.completion?.close();
    await this.prefetcher.close();
  }
}

function filesOf(blobs: readonly GearBlobTuple[]): Files {
  return blobs.map((b) => ({ digest: b[0], size: b[1] }));
}
