// Registry requests of a cold start without a prefetch profile, simulated with the node's own
// read-ahead code (plain ESM over dist/: run `npx tsc -p tsconfig.json` first).
//
//   node bench/read-ahead/sim.mjs ROOTFS OPENS [--base 128KiB] [--cache FILE]
//
// ROOTFS: the image's tree (a debootstrap rootfs, unpacked); OPENS: the files its task opens, first
// use first (trace-opens.sh). The tree is laid out in packs as gear convert lays out a one-layer image
// without a profile (pack-plan.ts: path order, zstd level 3 members when they save 10%, files of 4 MiB
// and more in 1 MiB chunks), summarized as a node records it (layers/index-entry.ts, with the
// directory numbers), and registered in a BlobCatalog. Each open of a file not yet fetched is a miss:
// one request, with the neighbours the provider would bring along (ReadAheadWindows +
// BlobCatalog.neighbours, as lazy/provider.ts; the pool's room is not simulated). Chunked files are
// counted apart (their reads cost requests of their own). Requests happen one after another, as
// for a single-threaded startup. Prints one line per read-ahead variant.
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const dist = new URL('../../dist/', import.meta.url);
const { comparePaths } = await import(new URL('core/index/manifest.js', dist));
const { layoutOrder, layoutPacks, memberEncoding, CHUNK_MIN_FILE_BYTES, CHUNK_BYTES } = await import(new URL('convert/pack-plan.js', dist));
const { summarize } = await import(new URL('core/layers/index-entry.js', dist));
const { BlobCatalog } = await import(new URL('core/lazy/catalog.js', dist));
const { ReadAheadWindows } = await import(new URL('core/lazy/read-ahead.js', dist));
const { native } = await import(new URL('core/sys/native.js', dist));

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  if (i < 0) return dflt;
  const v = args[i + 1];
  args.splice(i, 2);
  return v;
};
const cacheFile = opt('--cache');
const base = Number.parseInt(opt('--base', '131072'), 10);
const [root, opensFile] = args;
if (!root || !opensFile) {
  console.error('usage: node bench/read-ahead/sim.mjs ROOTFS OPENS [--base BYTES] [--cache FILE]');
  process.exit(2);
}

const sha = (b) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const stored = (data) => {
  const z = native.zstdCompress(data, 3).length;
  return memberEncoding(data.length, z) === 'zstd' ? z : data.length;
};

/** Regular non-empty files: { path, size, digest, members: stored lengths (one, or one per chunk) }. */
function scan() {
  if (cacheFile && existsSync(cacheFile)) return JSON.parse(readFileSync(cacheFile, 'utf8'));
  const out = [];
  const walk = (rel) => {
    for (const name of readdirSync(join(root, rel))) {
      const p = rel ? `${rel}/${name}` : name;
      const st = lstatSync(join(root, p));
      if (st.isDirectory()) walk(p);
      else if (st.isFile() && st.size > 0) {
        const data = readFileSync(join(root, p));
        const members = [];
        if (st.size >= CHUNK_MIN_FILE_BYTES) for (let o = 0; o < st.size; o += CHUNK_BYTES) members.push(stored(data.subarray(o, o + CHUNK_BYTES)));
        else members.push(stored(data));
        out.push({ path: p, size: st.size, digest: sha(data), chunked: st.size >= CHUNK_MIN_FILE_BYTES, members });
      }
    }
  };
  walk('');
  out.sort((a, b) => comparePaths(a.path, b.path));
  if (cacheFile) writeFileSync(cacheFile, JSON.stringify(out));
  return out;
}

const files = scan();
const byDigest = new Map(files.map((f) => [f.digest, f]));
const order = layoutOrder(files);
const packs = layoutPacks(order.map((d) => ({ digest: d, members: byDigest.get(d).members.map((length, i) => ({ length, digest: d, i })) })));
const where = new Map(); // digest → [{ pack, offset, length }] in member order
packs.forEach((p, pi) => {
  for (const { member, offset } of p.members) {
    if (!where.has(member.digest)) where.set(member.digest, []);
    where.get(member.digest).push({ pack: pi, offset, length: member.length, encoding: 'zstd' });
  }
});
const packRefs = packs.map((p, i) => ({ mediaType: 'application/vnd.gear.pack.v1', digest: `sha256:${i.toString(16).padStart(64, '0')}`, size: p.size }));
const manifest = {
  version: 3,
  packs: packRefs,
  files: files.map((f) => {
    const w = where.get(f.digest);
    if (!f.chunked) return { path: f.path, digest: f.digest, size: f.size, member: w[0] };
    return { path: f.path, digest: f.digest, size: f.size, chunkSize: CHUNK_BYTES, chunks: w.map((c, i) => ({ ...c, digest: `sha256:${i.toString(16).padStart(64, 'c')}` })) };
  }),
};
const summary = summarize(manifest);
const location = { registry: 'sim:5000', repository: 'sim' };
const byPath = new Map(files.map((f) => [f.path, f]));
const opens = readFileSync(opensFile, 'utf8').split('\n').filter((p) => byPath.has(p));

function simulate(label, ra, blobs) {
  const catalog = new BlobCatalog();
  catalog.add('sim', location, blobs, packRefs.map((p) => ({ digest: p.digest, size: p.size })));
  const pool = new Set();
  let requests = 0;
  let chunked = 0;
  let bytes = 0;
  for (const p of opens) {
    const f = byPath.get(p);
    if (pool.has(f.digest)) continue;
    pool.add(f.digest);
    if (f.chunked) {
      chunked++;
      continue;
    }
    const req = catalog.requests(f.digest)[0];
    const m = req.member;
    const window = ra.windowFor(m.pack.digest, m.offset);
    const along = catalog.neighbours(req, window, (d) => !pool.has(d), ra.dirBytes);
    requests++;
    bytes += m.length;
    let end = m.offset + m.length;
    for (const n of along) {
      pool.add(n.digest);
      bytes += n.member.length;
      end = Math.max(end, n.member.offset + n.member.length);
    }
    if (window > 0) ra.used(m.pack.digest, m.offset, end, window);
  }
  console.log(`${label.padEnd(44)} ${String(requests).padStart(5)} requests for packed files, ${(bytes / 1e6).toFixed(2)} MB stored; ${chunked} chunked files opened`);
}

console.log(`${root}: ${files.length} files, ${packs.length} packs; ${opens.length} files opened (${opensFile})`);
const noDirs = summary.blobs.map((t) => (typeof t[2] === 'object' && t[2] && 'p' in t[2] ? [t[0], t[1], { ...t[2], g: undefined }] : t));
simulate('read-ahead off', new ReadAheadWindows({ baseBytes: 0 }), summary.blobs);
simulate(`forward window ${base / 1024} KiB (x8)`, new ReadAheadWindows({ baseBytes: base }), noDirs);
simulate(`forward window + directory (${(4 * base) / 1024} KiB)`, new ReadAheadWindows({ baseBytes: base }), summary.blobs);
