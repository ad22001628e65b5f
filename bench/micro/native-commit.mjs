// How long does Pool.addBuffer's native commit (writeFileDurable: open, write, fchmod, fsync, fstat,
// close, rename as one threadpool task) take here, one at a time and with N in flight?
// Usage: node bench/micro/native-commit.mjs DIR [N] [SIZE]   (DIR on the filesystem of the gear root; removed after)
//        UV_THREADPOOL_SIZE=16 node bench/micro/native-commit.mjs …   (more libuv threads)
// Measured 2026-12-07 (2 cores, ext4, 600 files of 30 kB): 0.53 ms per file one at a time, 0.32 with 3 in flight,
// 0.26 with 4, 0.37 with 8, 0.56 with 16; with 16 libuv threads 0.71-0.88 ms at 3-16 in flight. The JS
// commit it replaced (bench/micro/pool-commit.mjs) took 1.8 ms one at a time.
import { createRequire } from 'node:module';
import { mkdirSync, rmSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
const native = createRequire(import.meta.url)(join(dirname(fileURLToPath(import.meta.url)), '../../build/Release/gear_native.node'));
const [dir, n = '600', size = '30000'] = process.argv.slice(2);
if (!dir) throw new Error('usage: node bench/micro/native-commit.mjs DIR [N] [SIZE]');
rmSync(dir, { recursive: true, force: true });
mkdirSync(join(dir, 's'), { recursive: true });
mkdirSync(join(dir, 'd'));
const buf = randomBytes(Number(size));
const N = Number(n);
for (const par of [1, 3, 4, 8, 16]) {
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: par }, async () => {
      while (next < N) {
        const i = next++;
        await native.writeFileDurable(join(dir, 's', `${par}-${i}`), join(dir, 'd', `${par}-${i}`), buf, 0o444);
      }
    }),
  );
  console.log(`libuv threads ${process.env.UV_THREADPOOL_SIZE ?? 4}, ${par} in flight: ${((performance.now() - t0) / N).toFixed(2)} ms per file`);
}
rmSync(dir, { recursive: true, force: true });
