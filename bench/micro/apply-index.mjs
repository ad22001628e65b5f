// How long does ApplyDiff's index build take for one index layer (readIndexLayer, tree, EROFS image or dir)?
// Usage: node bench/micro/apply-index.mjs INDEX.tar DIR [REPS] [image|dir]   (DIR: scratch, removed after)
//        WARM=1 node bench/micro/apply-index.mjs …   (the daemon's warm-up first; WARM=N: N files; WARM_ROUNDS=R: R rounds, default the daemon's;
//        WARM_PAUSE_MS=300: idle after it, as a daemon is before its first pull: V8 finishes its optimized code meanwhile)
//        node --cpu-prof --cpu-prof-dir=/tmp/prof bench/micro/apply-index.mjs …   (where the time goes)
import { createReadStream, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { applyIndexLayer } from '../../dist/core/layers/index-dir.js';
import { warmUpIndexCode } from '../../dist/core/layers/warm-up.js';
const [tar, dir, reps = '5', form = 'image'] = process.argv.slice(2);
if (!tar || !dir) throw new Error('usage: node bench/micro/apply-index.mjs INDEX.tar DIR [REPS] [image|dir]');
const samples = [];
if (process.env.WARM) {
  const files = Number(process.env.WARM) > 1 ? Number(process.env.WARM) : undefined;
  const rounds = process.env.WARM_ROUNDS ? Number(process.env.WARM_ROUNDS) : undefined;
  console.log(`warm-up (${files ?? 'default'} files, ${rounds ?? 'default'} rounds): ${(await warmUpIndexCode(undefined, files, rounds)).toFixed(0)} ms`);
  await new Promise((r) => setTimeout(r, Number(process.env.WARM_PAUSE_MS ?? 0)));
}
for (let i = 0; i < Number(reps); i++) {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const t0 = performance.now();
  let manifestAt = 0;
  const r = await applyIndexLayer(createReadStream(tar, { highWaterMark: 64 * 1024 }), form === 'image' ? { image: join(dir, 'index.img') } : { dir: join(dir, 'index') }, join(dir, 'index.tar'), () => {
    manifestAt = performance.now() - t0;
  });
  const ms = performance.now() - t0;
  samples.push(ms);
  console.log(`rep ${i + 1}: ${ms.toFixed(0)} ms (manifest at ${manifestAt.toFixed(0)} ms), ${r.files} files`);
}
samples.sort((a, b) => a - b);
console.log(`median ${samples[samples.length >> 1].toFixed(0)} ms over ${samples.length}`);
rmSync(dir, { recursive: true, force: true });
