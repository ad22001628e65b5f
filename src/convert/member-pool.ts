/**
 * The worker threads of a format v3 conversion: each task hashes one member
 * (a small file, or one chunk of a big file) with sha256 and, unless its
 * digest is already stored somewhere the conversion can reuse, compresses it
 * with zstd (level 3) and keeps the frame when it saves at least 10%
 * (pack-plan.ts memberEncoding). The main thread only parses tar and copies
 * bodies into task buffers (transferred, not copied, to the worker, and the
 * stored bytes transferred back).
 *
 * The pool is piscina (Node 20+). Piscina runs a worker *file*; this repository
 * runs from TypeScript sources under vitest and from dist/ otherwise, so the
 * worker is a small self-contained plain-JS module (WORKER_SOURCE) written
 * into the conversion's private staging directory (mode 0700) and run from
 * there (the project's other worker, missfs/reader-worker.ts, is an eval'd
 * string for the same reason; piscina takes no eval source). It loads the
 * gear native addon by path (as core/sys/native.ts does) and calls its
 * zstdCompress, the binding src/core/sys/zstd.ts wraps.
 */
import { writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Piscina } from 'piscina';
import { zstdCompress, ZSTD_DEFAULT_LEVEL } from '../core/sys/zstd.js';
import { ZSTD_WORTH_IT } from './pack-plan.js';

export interface MemberResult {
  /** sha256 hex of the member's bytes. */
  hex: string;
  /** True when the digest was in the known set: nothing was compressed and no bytes come back. */
  known: boolean;
  encoding?: 'zstd' | 'raw';
  /** The stored bytes (the zstd frame, or the input itself for raw). */
  bytes?: Uint8Array;
}

const WORKER_SOURCE = String.raw`
import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import { move, transferableSymbol, valueSymbol, workerData } from 'piscina';
const { addon, known, level, worthIt, compress } = workerData;
const native = createRequire(addon)(addon);
const knownSet = new Set(known);
// A task is a batch of members in one buffer (small files travel together: one message, not one per file);
// the stored bytes of those not known come back concatenated in one buffer.
export default function members(task) {
  const { buf, items, skipKnown } = task;
  const results = [];
  const outs = [];
  let total = 0;
  for (const [off, len] of items) {
    const data = buf.subarray(off, off + len);
    const hex = createHash('sha256').update(data).digest('hex');
    if (skipKnown && knownSet.has(hex)) {
      results.push({ hex, known: true });
      continue;
    }
    let encoding = 'raw';
    let bytes = data;
    if (compress) {
      const frame = native.zstdCompress(data, level);
      if (frame.length <= len * worthIt) {
        encoding = 'zstd';
        bytes = frame;
      }
    }
    results.push({ hex, known: false, encoding, length: bytes.length });
    outs.push(bytes);
    total += bytes.length;
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const b of outs) {
    out.set(b, at);
    at += b.length;
  }
  // Handed back, not copied: a conversion's stored bytes all come back this way.
  return move({ [transferableSymbol]: [out.buffer], [valueSymbol]: { results, out } });
}
`;

/** Path of the gear native addon, found as core/sys/native.ts finds it. */
function addonPath(): string {
  if (process.env.GEAR_NATIVE_MODULE) return process.env.GEAR_NATIVE_MODULE;
  // src/convert or dist/convert → the repository root is two levels up.
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
  return path.join(root, 'build', 'Release', 'gear_native.node');
}

export interface MemberPoolOptions {
  /** A private directory the worker module is written into. */
  dir: string;
  /** Member digests (hex) the workers do not compress (stored already, reusable). */
  known: Iterable<string>;
  /** Worker threads (default: the cores). */
  threads?: number;
  level?: number;
  /** False: every member is stored raw (gear convert --storage raw). */
  compress?: boolean;
}

export class MemberPool {
  private constructor(private readonly pool: Piscina) {}

  static async start(opts: MemberPoolOptions): Promise<MemberPool> {
    const level = opts.level ?? ZSTD_DEFAULT_LEVEL;
    zstdCompress(new Uint8Array(16), level); // the addon has zstd and the level is valid, before any worker starts
    const filename = path.join(opts.dir, 'member-worker.mjs');
    // Piscina hands its workerData option to the worker module through its own export (node:worker_threads'
    // workerData is piscina's bootstrap); the file is outside node_modules' reach, so name piscina by URL.
    await writeFile(filename, WORKER_SOURCE.replace("from 'piscina'", `from ${JSON.stringify(import.meta.resolve('piscina'))}`), { mode: 0o600 });
    const threads = Math.max(1, opts.threads ?? availableParallelism());
    const pool = new Piscina({
      filename,
      minThreads: threads,
      maxThreads: threads,
      // No queue limit here: MemberStage bounds the tasks and bytes in flight.
      idleTimeout: 60_000,
      workerData: { addon: addonPath(), known: [...opts.known], level, worthIt: ZSTD_WORTH_IT, compress: opts.compress !== false },
    });
    return new MemberPool(pool);
  }

  get threads(): number {
    return this.pool.threads.length || this.pool.options.maxThreads;
  }

  /**
   * Hashes the members `items` ([offset, length] in `buf`, a buffer of its own,
   * handed over: not to be used afterwards) and compresses those not known;
   * results in the same order.
   */
  async run(buf: Uint8Array, items: [number, number][], skipKnown: boolean): Promise<MemberResult[]> {
    // Transferred, not copied: buf is a buffer of its own (Buffer.allocUnsafeSlow).
    const r = (await this.pool.run({ buf, items, skipKnown }, { transferList: [buf.buffer as ArrayBuffer] })) as {
      results: { hex: string; known: boolean; encoding?: 'zstd' | 'raw'; length?: number }[];
      out: Uint8Array;
    };
    let at = 0;
    return r.results.map((x) => {
      if (x.known) return { hex: x.hex, known: true };
      const bytes = r.out.subarray(at, at + x.length!);
      at += x.length!;
      return { hex: x.hex, known: false, encoding: x.encoding!, bytes };
    });
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}
