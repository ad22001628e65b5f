/**
 * Adaptive read-ahead of pack members (format v3), per pack, in the manner of
 * the kernel's file readahead: a miss brings along the members that follow it
 * in its pack, up to a window of stored bytes. The window starts at `base`
 * and doubles (up to `max`) each time the next miss of that pack comes after
 * the previous window, within one window of its end: a reader walking the pack
 * forward (a tree walk over files kept in path order). A miss anywhere else
 * starts again at `base`, so scattered reads (a startup importing modules from
 * all over) pay only the base window each.
 *
 * Measured (docs/lazy.md): a fixed 1 MiB window tripled what a python3
 * startup received; a fixed 128 KiB window cost a tree walk 79 requests. On
 * the doc walk of test/integration/v3-walk.test.ts, 128 KiB growing to 1 MiB
 * made 36 requests for 6.5 MB (fixed 1 MiB: 43–45 for 7.7 MB; growing to
 * 4 MiB: 25 for 10.0 MB).
 *
 * A miss also brings the files of its directory lying next to it in the pack,
 * on both sides, when that run spans at most `dirBytes` (4 × base: 512 KiB):
 * a program importing modules opens the files of one directory in no
 * particular order, and a forward window misses the ones before. Simulated
 * with this code on the bench's tasks (bench/read-ahead/sim.mjs): numpy
 * 65 → 53 requests for packed files with 3% fewer bytes, python3 37 → 33
 * (-4% bytes), nodejs and minbase unchanged.
 */

export interface ReadAheadOptions {
  /** The first window of a pack, stored bytes; 0 turns read-ahead off. */
  baseBytes: number;
  /** The largest window. Default 8 × base (1 MiB for a 128 KiB base), never below base. */
  maxBytes?: number;
  /** Packs remembered (least recently missed ones are forgotten). Default 1024. */
  maxPacks?: number;
  /** The largest run of a directory's files brought along whole. Default 4 × base; 0 when base is 0. */
  dirBytes?: number;
}

interface PackState {
  /** Stored offset of the miss that opened the last window. */
  start: number;
  /** End (stored offset) of what the last window covered. */
  end: number;
  window: number;
}

export class ReadAheadWindows {
  readonly baseBytes: number;
  readonly maxBytes: number;
  readonly dirBytes: number;
  private readonly maxPacks: number;
  /** By pack digest, least recently missed first. */
  private readonly packs = new Map<string, PackState>();

  constructor(opts: ReadAheadOptions) {
    this.baseBytes = Math.max(0, Math.floor(opts.baseBytes));
    this.maxBytes = Math.max(this.baseBytes, Math.floor(opts.maxBytes ?? this.baseBytes * 8));
    this.maxPacks = Math.max(1, opts.maxPacks ?? 1024);
    this.dirBytes = this.baseBytes > 0 ? Math.max(0, Math.floor(opts.dirBytes ?? this.baseBytes * 4)) : 0;
  }

  /** The window for a miss of the member at `offset` of `pack`. */
  windowFor(pack: string, offset: number): number {
    if (this.baseBytes <= 0) return 0;
    const s = this.packs.get(pack);
    if (s && offset > s.start && offset <= s.end + s.window) return Math.min(s.window * 2, this.maxBytes);
    return this.baseBytes;
  }

  /** Records the window a miss at `start` used, and where what it fetched ends. */
  used(pack: string, start: number, end: number, window: number): void {
    if (this.baseBytes <= 0) return;
    this.packs.delete(pack);
    this.packs.set(pack, { start, end: Math.max(start, end), window });
    if (this.packs.size > this.maxPacks) {
      const oldest = this.packs.keys().next().value;
      if (oldest !== undefined) this.packs.delete(oldest);
    }
  }
}
