/**
 * Long-running work on one layer that its removal cancels: an ApplyDiff
 * reading its tar (whose client may have stalled, holding the layer's lock)
 * and the Diff streams being read from it. Remove cancels them first, so it
 * never waits behind a stalled client, and they end with an error that says
 * why instead of reading a layer that is going away.
 */
export type Cancel = (reason: Error) => void;

export class LayerActivity {
  private readonly byLayer = new Map<string, Set<Cancel>>();

  /** Registers work on `id`; the returned function unregisters it (call it in a finally). */
  begin(id: string, cancel: Cancel): () => void {
    let set = this.byLayer.get(id);
    if (!set) this.byLayer.set(id, (set = new Set()));
    set.add(cancel);
    return () => {
      const s = this.byLayer.get(id);
      if (!s) return;
      s.delete(cancel);
      if (s.size === 0) this.byLayer.delete(id);
    };
  }

  /** Cancels all registered work on `id` with `reason`; returns how many. */
  cancelAll(id: string, reason: Error): number {
    const set = this.byLayer.get(id);
    if (!set) return 0;
    this.byLayer.delete(id);
    for (const cancel of set) cancel(reason);
    return set.size;
  }

  /** How many pieces of work run on `id`. */
  count(id: string): number {
    return this.byLayer.get(id)?.size ?? 0;
  }
}
