// How long does BlobCatalog.add take for one index's files (ApplyDiff's 'referenced' phase)?
// Usage: node bench/micro/catalog-add.mjs [FILES=6606] [REPS=6]   (synthetic v3 tuples in 3 packs; needs dist/)
//        node --cpu-prof --cpu-prof-dir=/tmp/prof bench/micro/catalog-add.mjs   (where the time goes)
import { randomBytes } from 'node:crypto';
import { BlobCatalog } from '../../dist/core/lazy/catalog.js';
const [files = '6606', reps = '6'] = process.argv.slice(2);
const packs = [0, 1, 2].map(() => ({ digest: `sha256:${randomBytes(32).toString('hex')}`, size: 33e6 }));
const loc = { registry: 'r:5000', repository: 'x' };
const samples = [];
for (let r = 0; r < Number(reps); r++) {
  const tuples = Array.from({ length: Number(files) }, (_, i) => [`sha256:${randomBytes(32).toString('hex')}`, 1000 + i, { p: i % 3, o: i * 1000, l: 900 }]);
  const c = new BlobCatalog();
  const t0 = performance.now();
  c.add(`L${r}`, loc, tuples, packs);
  samples.push(performance.now() - t0);
  console.log(`rep ${r + 1}: add ${samples.at(-1).toFixed(1)} ms`);
}
samples.sort((a, b) => a - b);
console.log(`median ${samples[samples.length >> 1].toFixed(1)} ms over ${samples.length}`);
