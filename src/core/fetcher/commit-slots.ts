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
 * members (prefetch, read-ahead, resume) take at most `background` slots.
 * (A throttle that held background commits to 2 slots while an ApplyDiff
 * built the index of a layer whose prefetch it had started is gone with that
 * early start: the prefetch starts once the layer is recorded, store.ts.)
 *
 *   const release = await slots.take(urgent);   // … commit …  release();
 */
export const COMMIT_SLOTS = 8;
export const BACKGROUND_COMMIT_SLOTS = 6;

export class CommitSlots {
  private running = 0;
  private runningBackground = 0;
  private readonly urgentQueue: Array<() => void> = [];
  private readonly backgroundQueue: Array<() => void> = [];

  constructor(
    readonly total = COMMIT_SLOTS,
    readonly background = BACKGROUND_COMMIT_SLOTS,
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

  private pump(): void {
    while (this.running < this.total && this.urgentQueue.length > 0) this.urgentQueue.shift()!();
    while (this.running < this.total && this.runningBackground < this.background && this.backgroundQueue.length > 0) this.backgroundQueue.shift()!();
  }
}
