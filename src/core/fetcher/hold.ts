/**
 * A hold on background work: while an ApplyDiff builds the index of a layer
 * whose prefetch it started, the prefetch's responses keep arriving but their
 * members wait to be decoded, verified and committed (pack-fetch.ts), so the
 * prefetch never takes the main thread (or the disk's journal) from the pull.
 * Measured on python3 with a 930-file profile (unshaped link): ApplyDiff took
 * 661 ms with the prefetch running beside it against 357 ms without a profile.
 * A container's own misses (foreground) are never held.
 *
 *   const release = hold.hold();      // ApplyDiff starts the prefetch
 *   …build the index…
 *   release();                        // idempotent; also released after maxMs
 *   await hold.gate();                // background deliveries: undefined when not held
 */
export const DEFAULT_MAX_HOLD_MS = 10_000;

export class BackgroundHold {
  private holds = 0;
  private waiters: Array<() => void> = [];

  /** True while some hold is in place. */
  get held(): boolean {
    return this.holds > 0;
  }

  /** Holds background deliveries until the returned function is called, or maxMs passed (a forgotten release never stalls the prefetch for good). */
  hold(maxMs = DEFAULT_MAX_HOLD_MS): () => void {
    this.holds++;
    let done = false;
    const release = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (--this.holds > 0) return;
      const waiters = this.waiters;
      this.waiters = [];
      for (const w of waiters) w();
    };
    const timer = setTimeout(release, maxMs);
    timer.unref();
    return release;
  }

  /** Resolves when no hold is in place; undefined at once when none is. */
  gate(): Promise<void> | undefined {
    if (this.holds === 0) return undefined;
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}
