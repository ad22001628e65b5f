// Main-thread cost of gunzipping Gear files into the pool at a given zlib output
// chunk size (the fetcher's pipeline: gunzip -> PoolWriter.write -> commit).
// Not part of make bench. Needs dist/ (npx tsc) and root-free temp space.
//   node bench/micro/gunzip-chunks.mjs 16384 262144
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip, gzipSync } from 'node:zlib';
import { Pool } from '../../dist/core/pool/pool.js';

const FILES = [process.execPath, '/usr/bin/perl', '/bin/busybox', '/usr/bin/python3.11'].filter((f) => {
  try {
    readFileSync(f);
    return true;
  } catch {
    return false;
  }
});
const blobs = FILES.map((f) => {
  const d = readFileSync(f);
  return { d, gz: gzipSync(d), hex: createHash('sha256').update(d).digest('hex') };
});
const MB = blobs.reduce((a, b) => a + b.d.length, 0) / 1e6;

async function measure(chunkSize, reps = 3) {
  const root = mkdtempSync(join(tmpdir(), 'gear-gunzip-'));
  const pool = await Pool.open({ root, capBytes: 100e9 });
  try {
    const elu0 = performance.eventLoopUtilization();
    const t0 = performance.now();
    for (let r = 0; r < reps; r++) {
      await Promise.all(
        blobs.map(async (b) => {
          const w = await pool.beginWrite(`sha256:${b.hex}`, b.d.length);
          const src = Readable.from((function* () { for (let i = 0; i < b.gz.length; i += 65536) yield b.gz.subarray(i, i + 65536); })());
          const sink = new Writable({ write: (c, _e, cb) => void w.write(c).then(() => cb(), cb) });
          await pipeline(src, createGunzip({ chunkSize }), sink);
          await w.commit();
        }),
      );
    }
    const elu = performance.eventLoopUtilization(elu0);
    const ms = performance.now() - t0;
    console.log(`chunk ${String(chunkSize).padStart(7)}: ${(reps * MB).toFixed(1)} MB in ${ms.toFixed(0)} ms; main thread busy ${elu.active.toFixed(0)} ms (${(elu.active / (reps * MB)).toFixed(1)} ms/MB)`);
  } finally {
    await pool.close();
    rmSync(root, { recursive: true, force: true });
  }
}

console.log(`files: ${FILES.join(', ')} (${MB.toFixed(1)} MB)`);
for (const c of process.argv.slice(2).map(Number)) await measure(c);
