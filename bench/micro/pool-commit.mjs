// How long does the pool's per-file commit (write, chmod, fsync, close, rename) take here?
// Usage: node bench/micro/pool-commit.mjs DIR [N] [SIZE]   (DIR on the filesystem of the gear root; removed after)
import { open, rename, mkdir, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
const [dir, n = '1000', size = '8192'] = process.argv.slice(2);
await mkdir(dir + '/s', { recursive: true }); await mkdir(dir + '/d', { recursive: true });
const buf = randomBytes(Number(size));
async function one(i, sync) {
  const p = `${dir}/s/${i}`;
  const fh = await open(p, 'wx');
  await fh.write(buf); await fh.chmod(0o444);
  if (sync) await fh.sync();
  await fh.close(); await rename(p, `${dir}/d/${sync ? 's' : 'n'}${i}`);
}
for (const sync of [true, false]) {
  const t0 = process.hrtime.bigint();
  // 4 at a time, as the libuv threadpool would run them
  let next = 0; const N = Number(n);
  await Promise.all([0,1,2,3].map(async () => { while (next < N) await one(next++, sync); }));
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  console.log(`${sync ? 'with fsync   ' : 'without fsync'}: ${N} files of ${size} B in ${ms.toFixed(0)} ms (${(ms / N).toFixed(2)} ms per file, 4 in flight)`);
}
await rm(dir, { recursive: true, force: true });
