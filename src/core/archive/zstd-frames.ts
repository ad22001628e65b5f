/**
 * A bound on the memory a zstd stream can make its decoder allocate.
 *
 * fzstd allocates each frame's whole window up front, sized by the frame
 * header: a 20-byte hostile layer could claim a ~2 GiB window (and fzstd's
 * per-block window shifts then touch all of it). ZstdFrameGuard walks the
 * frame and block headers of the compressed bytes before they reach fzstd,
 * without decoding anything, and refuses a frame whose window is larger than
 * Go's zstd decoder (klauspost/compress, what Docker and containerd use)
 * accepts by default: 512 MiB. A single-segment frame's window is its
 * content size, as the format says.
 *
 * Malformed headers are left to fzstd to report; the guard only stops
 * watching (it never throws on anything but a window over the limit).
 */
import { invalidArgument } from '../errors.js';

/** klauspost/compress zstd MaxWindowSize: the default decoder maximum window. */
export const MAX_ZSTD_WINDOW = 1 << 29;

const ZSTD_MAGIC = 0xfd2fb528;
const SKIPPABLE_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;
const DID_BYTES = [0, 1, 2, 4] as const;
const FCS_BYTES = [0, 2, 4, 8] as const;

type State = 'magic' | 'skippable-size' | 'frame-descriptor' | 'frame-header' | 'block-header' | 'off';

export class ZstdFrameGuard {
  private state: State = 'magic';
  /** Header bytes collected for the current state, and how many it needs. */
  private hdr: number[] = [];
  private need = 4;
  /** Bytes to pass unexamined (block contents, checksums, skippable frames), then `next`. */
  private skip = 0;
  private next: State = 'magic';
  private checksum = false;
  /** Frames seen so far (for the error message). */
  private frames = 0;

  constructor(private readonly maxWindow: number = MAX_ZSTD_WINDOW) {}

  /** Examines the next compressed bytes; throws InvalidArgument for a frame over the window limit. */
  check(chunk: Uint8Array): void {
    let i = 0;
    while (i < chunk.length && this.state !== 'off') {
      if (this.skip > 0) {
        const n = Math.min(this.skip, chunk.length - i);
        this.skip -= n;
        i += n;
        if (this.skip === 0) this.enter(this.next);
        continue;
      }
      this.hdr.push(chunk[i++]!);
      if (this.hdr.length >= this.need) this.step();
    }
  }

  private enter(state: State, need = state === 'magic' || state === 'skippable-size' ? 4 : state === 'block-header' ? 3 : 1): void {
    this.state = state;
    this.need = need;
    this.hdr = [];
  }

  private passThen(bytes: number, next: State): void {
    this.skip = bytes;
    this.next = next;
    if (bytes === 0) this.enter(next);
    else this.hdr = [];
  }

  private u(at: number, n: number): number {
    let v = 0;
    for (let k = n - 1; k >= 0; k--) v = v * 256 + this.hdr[at + k]!;
    return v;
  }

  private step(): void {
    switch (this.state) {
      case 'magic': {
        const m = this.u(0, 4);
        if (m === ZSTD_MAGIC) return this.enter('frame-descriptor');
        if (((m & SKIPPABLE_MASK) >>> 0) === SKIPPABLE_MAGIC) return this.enter('skippable-size');
        return this.enter('off'); // not zstd: fzstd reports it
      }
      case 'skippable-size':
        return this.passThen(this.u(0, 4), 'magic');
      case 'frame-descriptor': {
        const fhd = this.hdr[0]!;
        const single = (fhd & 0x20) !== 0;
        const fcsFlag = fhd >> 6;
        const rest = (single ? 0 : 1) + DID_BYTES[fhd & 3]! + (fcsFlag === 0 ? (single ? 1 : 0) : FCS_BYTES[fcsFlag]!);
        this.checksum = (fhd & 0x04) !== 0;
        this.need = 1 + rest;
        if (this.hdr.length >= this.need) return this.step(); // cannot happen (rest ≥ 1), kept for safety
        this.state = 'frame-header';
        return;
      }
      case 'frame-header': {
        const fhd = this.hdr[0]!;
        const single = (fhd & 0x20) !== 0;
        const fcsFlag = fhd >> 6;
        let at = 1;
        let window = 0;
        if (!single) {
          const wd = this.hdr[at++]!;
          const base = 2 ** (10 + (wd >> 3));
          window = base + (base / 8) * (wd & 7);
        }
        at += DID_BYTES[fhd & 3]!;
        const fcsBytes = fcsFlag === 0 ? (single ? 1 : 0) : FCS_BYTES[fcsFlag]!;
        const fcs = this.u(at, fcsBytes) + (fcsFlag === 1 ? 256 : 0);
        if (single) window = fcs;
        this.frames++;
        if (window > this.maxWindow) {
          throw invalidArgument(
            `zstd frame ${this.frames} needs a ${window}-byte window, over the ${this.maxWindow}-byte limit (Docker's decoder limit too; recompress without --long or with a smaller window)`,
          );
        }
        return this.enter('block-header');
      }
      case 'block-header': {
        const v = this.u(0, 3);
        const last = (v & 1) === 1;
        const type = (v >> 1) & 3;
        if (type === 3) return this.enter('off'); // reserved block type: fzstd reports it
        const content = type === 1 ? 1 : v >>> 3;
        return this.passThen(content + (last && this.checksum ? 4 : 0), last ? 'magic' : 'block-header');
      }
      default:
        return;
    }
  }
}
