/**
 * What the layer store adds for operators besides `docker info`: the
 * containers-on-non-Gear-images watch (stats/nonlazy.ts), the `gear stats`
 * report (stats/report.ts) and the control endpoint that serves it
 * (control/server.ts). Kept out of store.ts, which only wires it in.
 */
import { serveControl, type ControlServer } from '../control/server.js';
import { randomBytes } from 'node:crypto';
import { describeError, failedPrecondition, invalidArgument } from '../errors.js';
import type { LazyRuntime } from '../lazy/runtime.js';
import type { Prefetcher } from '../lazy/prefetch.js';
import type { Logger } from '../log.js';
import { NonLazyContainers } from '../stats/nonlazy.js';
import { buildStatsReport, type StatsReport } from '../stats/report.js';
import { MAX_LAYER_DEPTH } from './records.js';
import type { LayerRecord } from './types.js';

export interface StoreStatsSources {
  root: string;
  records: ReadonlyMap<string, LayerRecord>;
  lazy: () => LazyRuntime | undefined;
  prefetch: () => Prefetcher | undefined;
  logger?: Logger | undefined;
}

export class StoreStats {
  readonly nonLazy: NonLazyContainers;
  readonly since = Date.now();
  /** Which layers are containers and their names, set by a frontend that knows better (the snapshotter's active snapshots). */
  containers: (() => ReadonlyMap<string, string>) | undefined;
  private control: ControlServer | undefined;
  private readonly src: StoreStatsSources;

  constructor(src: StoreStatsSources, requireLazy: boolean) {
    this.src = src;
    this.nonLazy = new NonLazyContainers({ requireLazy, ...(src.logger ? { logger: src.logger } : {}) });
  }

  /** The Gear index layer in the chain of id (inclusive), if any. */
  indexLayerOf(id: string): string | undefined {
    let cur: string | undefined = id;
    for (let depth = 0; cur && depth <= MAX_LAYER_DEPTH; depth++) {
      const r = this.src.records.get(cur);
      if (!r) return undefined;
      if (r.gear) return r.id;
      cur = r.parent;
    }
    return undefined;
  }

  /**
   * A container is about to be created on `parent` (its image's top layer, '' for none). When no
   * Gear index layer is in that chain: refused here with --require-lazy, else the returned function
   * (to call once the container exists) counts and warns about it.
   */
  admitContainer(id: string, parent: string, image?: string): (() => void) | undefined {
    if (parent && this.indexLayerOf(parent)) return undefined;
    const c = { id, image: image ?? parent, layers: parent ? 1 + (this.src.records.get(parent)?.lowers.length ?? 0) : 0 };
    this.nonLazy.admit(c);
    return () => this.nonLazy.note(c);
  }

  report(): StatsReport {
    const lazy = this.src.lazy();
    const prefetch = this.src.prefetch();
    return buildStatsReport({
      root: this.src.root,
      since: this.since,
      layers: this.src.records.values(),
      ...(lazy ? { pool: lazy.pool, usage: lazy.usage } : {}),
      ...(prefetch ? { prefetch: (l: string) => prefetch.layerProgress(l) } : {}),
      nonLazy: this.nonLazy.state(),
      ...(this.containers ? { containers: this.containers() } : {}),
    });
  }

  /** Starts the control endpoint at ROOT/gear-control.sock; a failure is logged, never fatal (gear stats then says so). */
  async serve(): Promise<void> {
    try {
      this.control = await serveControl(
        this.src.root,
        {
          '/v1/stats': () => this.report(),
          '/v1/ping': () => ({ ok: true, pid: process.pid, root: this.src.root }),
        },
        this.src.logger,
        { '/v1/cache/verify': (q, progress, signal) => this.verify(q, progress, signal) },
      );
    } catch (err) {
      this.src.logger?.error({ err: describeError(err) }, 'cannot serve the control endpoint: gear stats will not reach this daemon');
    }
  }

  /**
   * `gear cache verify` through this daemon: a scrub now (after the one running, if any) at
   * ?rate=BYTES/s (default: the daemon's), with its progress every 500 ms; the result is the
   * scrub's record. The scrub goes on if the client leaves (it is the daemon's own work).
   */
  private async verify(q: URLSearchParams, progress: (p: unknown) => void, signal: AbortSignal): Promise<unknown> {
    const scrubber = this.src.lazy()?.scrubber;
    if (!scrubber) throw failedPrecondition('this daemon runs with lazy pull off: it does not hold the pool; stop it and run gear cache verify to scrub offline');
    const rateText = q.get('rate');
    const rate = rateText === null ? undefined : Number(rateText);
    if (rate !== undefined && !(Number.isSafeInteger(rate) && rate > 0)) throw invalidArgument(`rate ${JSON.stringify(rateText)}: expected a positive whole number of bytes per second`);
    const id = `ctl-${randomBytes(6).toString('hex')}`;
    this.src.logger?.info({ id, rate }, 'scrub: requested by gear cache verify (control socket)');
    const run = scrubber.runNow(id, rate);
    const timer = setInterval(() => {
      const r = scrubber.stats().running;
      if (r?.id === id && !signal.aborted) progress(r.progress);
    }, 500);
    try {
      return await run;
    } finally {
      clearInterval(timer);
    }
  }

  get socket(): string | undefined {
    return this.control?.socket;
  }

  status(): Array<[string, string]> {
    return [...this.nonLazy.status(), ['Control Socket', this.control ? this.control.socket : 'off']];
  }

  async close(): Promise<void> {
    await this.control?.close();
    this.control = undefined;
  }
}
