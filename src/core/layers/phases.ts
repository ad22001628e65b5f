/** How long each phase of a long call took, for its debug log: mark('built') after each, then durations. */
export class Phases {
  private last = Date.now();
  readonly durations: Record<string, number> = {};

  /** Ends the phase `name` (it began where the previous one ended, or at construction). */
  mark(name: string): void {
    const now = Date.now();
    this.durations[name] = now - this.last;
    this.last = now;
  }
}
