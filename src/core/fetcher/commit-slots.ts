/**
 * Commit slots: how many fetched pack members are being written into the
 * pool at once, fetcher-wide. Each commit is one threadpool task (decode,
 * hash, write, fsync, rename: Pool.addBuffer); libuv has 4 threads and the
 * rest of the daemon queues behind what waits there: the writes and syncs of
 * an ApplyDiff recording a layer, the reads of pool files behind a
 * container's READs. Enough commits must be in flight, though: each one's
 * completion waits for a turn of the event loop, which an index build holds
 * for up to 8 ms at a time (slices.ts); with 3 in flight python3's 930-file
 * prefetch spent 4.8 ms per commit, 1.6 ms per member.
 *
 * A container's miss (urgent) takes any free slot and goes first; background
 * members (prefetch, read-ahead, resume) take at most `background` slots, or
 * `throttled` while some throttle is held: an ApplyDiff building the index of
 * a layer whose prefetch it started (its record and sync phases took 36-94 ms
 * against 9-18 without a profile; 10-26 ms throttled). The queue then drains
 * faster; no burst.
 *
 *   const release = await slots.take(urgent);   // … commit …  release();
 *   const end = slots.throttle();               // … ApplyDiff …  end();
 */
export const COMMIT_SLOTS = 8;
export const BACKGROUND_COMMIT_SLOTS = 6;
export const THROTTLED_COMMIT_SLOTS = 2;
/** A throttle nobody ended ends by itself after this long. */
export const MAX_THROTTLE_MS = 10_000;

export class CommitSlots {
  private running = 0;
  private runningBackground = 0;
  private throttles = 0;
  private readonly urgentQueue: Array<() => void> = [];
  private readonly backgroundQueue: Array<() => void> = [];

  constructor(
    readonly total = COMMIT_SLOTS,
    readonly background = BACKGROUND_COMMIT_SLOTS,
    readonly throttled = THROTTLED_COMMIT_SLOTS,
  ) {}

  /** Commits running now, and how many of them are background ones (tests, status). */
  get inUse(): { all: number; background: number } {
    return { all: this.running, background: this.runningBackground };
  }

  /** Resolves with the release of a slot (idempotent) once one is free for this kind of commit. */
  take(urgent: boolean): Promise<() => void> {
    return new Promise((resolve) => {
      const start = () => {
        this.running++;
        if (!urgent) this.runningBackground++;
        let done = false;
        resolve(() => {
          if (done) return;
          done = true;
          this.running--;
          if (!urgent) this.runningBackground--;
          this.pump();
        });
      };
      (urgent ? this.urgentQueue : this.backgroundQueue).push(start);
      this.pump();
    });
  }

  /** Background commits take at most `throttled` slots until the returned function is called (or MAX_THROTTLE_MS passed). */
  throttle(maxMs = MAX_THROTTLE_MS): () => void {
    this.throttles++;
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      this.throttles--;
      this.pump();
    };
    const timer = setTimeout(end, maxMs);
    timer.unref();
    return end;
  }

  private pump(): void {
    while (this.running < this.total && this.urgentQueue.length > 0) this.urgentQueue.shift()!();
    const limit = this.throttles > 0 ? this.throttled : this.background;
    while (this.running < this.total && this.runningBackground < limit && this.backgroundQueue.length > 0) this.backgroundQueue.shift()!();
  }
}
