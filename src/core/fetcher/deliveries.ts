/**
 * The members of one pack response in the pool's hands at once
 * (pack-fetch.ts). A commit is a chain of file-system calls ending in an
 * fsync (about 2 ms here, one after another): committing the members of a
 * response one at a time held a 930-file prefetch to 3 s on an unshaped link,
 * with the container's opens waiting in line. Bounded in count and bytes, so
 * a slow disk slows the body (backpressure) instead of filling memory.
 *
 * Held (hold.ts: an ApplyDiff is building an index), members are taken
 * without waiting, so the body keeps arriving (its bytes are in the
 * response's buffer already), and delivered once the hold ends, within the
 * same bounds.
 *
 *   const d = new Deliveries(held);
 *   await d.add(() => deliver(member), member.length);   // per member, in body order
 *   await d.drain();                                       // before the request's slot is freed
 */

/** Members of one response being decoded and committed at once, at most. */
export const MAX_DELIVERIES = 8;
/** Their stored bytes at once, at most (one member alone may be larger). */
export const MAX_DELIVERY_BYTES = 16 * 1024 * 1024;

export class Deliveries {
  private readonly running = new Set<Promise<void>>();
  private readonly waiting = new Set<Promise<void>>();
  private bytes = 0;

  constructor(private readonly held?: () => Promise<void> | undefined) {}

  /** Takes one delivery (`run` never rejects); resolves when the body may go on. */
  add(run: () => Promise<void>, bytes: number): Promise<void> {
    const gate = this.held?.();
    if (!gate) return this.admit(run, bytes);
    const later = gate.then(() => this.admit(run, bytes));
    this.waiting.add(later);
    void later.finally(() => this.waiting.delete(later));
    return Promise.resolve();
  }

  /** Resolves when every delivery taken has settled. */
  async drain(): Promise<void> {
    while (this.waiting.size > 0 || this.running.size > 0) await Promise.all([...this.waiting, ...this.running]);
  }

  private async admit(run: () => Promise<void>, bytes: number): Promise<void> {
    while (this.running.size >= MAX_DELIVERIES || (this.bytes + bytes > MAX_DELIVERY_BYTES && this.running.size > 0)) await Promise.race(this.running);
    this.bytes += bytes;
    const p = run().finally(() => {
      this.running.delete(p);
      this.bytes -= bytes;
    });
    this.running.add(p);
  }
}
