// zstd levels against Node's gzip on the member layout of format v3
// (docs/format.md §10, §10.4): every regular file of a corpus, files of at
// least 4 MiB split in 1 MiB chunks, each member compressed on its own.
// Per codec: stored bytes (plain, and with the converter's rule "compressed
// only when it saves >= 10%, else raw"), compress and decompress MB/s of CPU
// time on one core (the process's user+system time around each call; the
// machine may be shared, so wall time is printed too). Every decompressed
// member is compared with its original. Not part of make bench. Needs dist/
// (npx tsc) and the native addon (npm ci).
//   node bench/micro/zstd-levels.mjs [--sample N] [DIR...]
// --sample N: level 19 runs on every Nth member only (default 10), reported
// against the other codecs on the same sample.
import { lstatSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { gunzipSync, gzipSync } from 'node:zlib';
import { ZSTD_VERSION, zstdCompress, zstdDecompress } from '../../dist/core/sys/zstd.js';

const args = process.argv.slice(2);
let sampleEvery = 10;
const si = args.indexOf('--sample');
if (si >= 0) {
  sampleEvery = Number(args[si + 1]);
  args.splice(si, 2);
}
const pythonDirs = readdirSync('/usr/lib')
  .filter((n) => /^python3/.test(n))
  .map((n) => join('/usr/lib', n));
const DIRS = args.length > 0 ? args : ['/usr/bin', '/usr/lib/x86_64-linux-gnu', '/usr/share/perl', ...pythonDirs, '/etc'];
const CHUNKED_FROM = 4 << 20;
const CHUNK = 1 << 20;
const MAX_FILES = 200_000;

function* walk(dir, seen) {
  let names;
  try {
    names = readdirSync(dir);
  } catch {
    return;
  }
  for (const name of names.sort()) {
    const p = join(dir, name);
    let st;
    try {
      st = lstatSync(p);
    } catch {
      continue;
    }
    if (st.isDirectory()) yield* walk(p, seen);
    else if (st.isFile() && st.size > 0) {
      const key = `${st.dev}:${st.ino}`;
      if (seen.has(key) || seen.size >= MAX_FILES) continue;
      seen.add(key);
      yield p;
    }
  }
}

const codecs = [
  { name: 'zstd -1', c: (b) => zstdCompress(b, 1), d: (z, n) => zstdDecompress(z, n) },
  { name: 'zstd -3', c: (b) => zstdCompress(b, 3), d: (z, n) => zstdDecompress(z, n) },
  { name: 'zstd -6', c: (b) => zstdCompress(b, 6), d: (z, n) => zstdDecompress(z, n) },
  { name: 'gzip -1', c: (b) => gzipSync(b, { level: 1 }), d: (z) => gunzipSync(z) },
  { name: 'gzip -6', c: (b) => gzipSync(b, { level: 6 }), d: (z) => gunzipSync(z) },
  { name: 'zstd -19', c: (b) => zstdCompress(b, 19), d: (z, n) => zstdDecompress(z, n), sampled: true },
];
// The sample's totals for every codec, to compare level 19 on the same bytes.
const fresh = () => ({ raw: 0, stored: 0, worth: 0, cCpu: 0, dCpu: 0, cWall: 0, dWall: 0 });
const all = new Map(codecs.map((k) => [k.name, fresh()]));
const sample = new Map(codecs.map((k) => [k.name, fresh()]));
const wholeFile3 = fresh(); // zstd -3 on whole files (no chunks), stored bytes only
let files = 0;
let members = 0;
let rawBytes = 0;

function cpu() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function run(codec, buf, into) {
  const c0 = cpu();
  const w0 = performance.now();
  const z = codec.c(buf);
  const w1 = performance.now();
  const c1 = cpu();
  const out = codec.d(z, buf.length);
  const w2 = performance.now();
  const c2 = cpu();
  if (!out.equals(buf)) throw new Error(`${codec.name}: round trip differs`);
  for (const t of into) {
    t.raw += buf.length;
    t.stored += z.length;
    t.worth += z.length <= buf.length * 0.9 ? z.length : buf.length;
    t.cCpu += c1 - c0;
    t.dCpu += c2 - c1;
    t.cWall += (w1 - w0) / 1e3;
    t.dWall += (w2 - w1) / 1e3;
  }
}

const t0 = performance.now();
const seen = new Set();
for (const dir of DIRS) {
  for (const file of walk(dir, seen)) {
    let data;
    try {
      data = readFileSync(file);
    } catch {
      continue;
    }
    files++;
    rawBytes += data.length;
    const z = zstdCompress(data, 3);
    wholeFile3.raw += data.length;
    wholeFile3.stored += z.length;
    wholeFile3.worth += z.length <= data.length * 0.9 ? z.length : data.length;
    const parts = [];
    if (data.length >= CHUNKED_FROM) for (let o = 0; o < data.length; o += CHUNK) parts.push(data.subarray(o, o + CHUNK));
    else parts.push(data);
    for (const m of parts) {
      const inSample = members % sampleEvery === 0;
      members++;
      for (const codec of codecs) {
        if (codec.sampled && !inSample) continue;
        const into = [];
        if (!codec.sampled) into.push(all.get(codec.name));
        if (inSample) into.push(sample.get(codec.name));
        run(codec, m, into);
      }
    }
    if (files % 1000 === 0) process.stderr.write(`${files} files, ${(rawBytes / 1e6).toFixed(0)} MB…\n`);
  }
}

const mb = (n) => (n / 1e6).toLocaleString('en-US', { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const pct = (a, b) => `${((100 * a) / b).toFixed(1)}%`;
const rate = (bytes, s) => (s > 0 ? `${Math.round(bytes / 1e6 / s)}` : '–');
function table(totals, names) {
  const lines = [
    '| codec | stored (every member compressed) | stored (raw when < 10% saved) | compress MB/s (CPU s; wall s) | decompress MB/s (CPU s; wall s) |',
    '| --- | --- | --- | --- | --- |',
  ];
  for (const n of names) {
    const t = totals.get(n);
    lines.push(
      `| ${n} | ${mb(t.stored)} MB (${pct(t.stored, t.raw)}) | ${mb(t.worth)} MB (${pct(t.worth, t.raw)}) | ` +
        `${rate(t.raw, t.cCpu)} (${t.cCpu.toFixed(1)} s; ${t.cWall.toFixed(1)} s) | ${rate(t.raw, t.dCpu)} (${t.dCpu.toFixed(1)} s; ${t.dWall.toFixed(1)} s) |`,
    );
  }
  return lines.join('\n');
}

const sampleRaw = sample.get('zstd -1').raw;
console.log(
  `libzstd ${ZSTD_VERSION}, Node ${process.version} zlib ${process.versions.zlib}; corpus: ${DIRS.join(', ')}: ` +
    `${files.toLocaleString('en-US')} files, ${mb(rawBytes)} MB, ${members.toLocaleString('en-US')} members ` +
    `(files >= 4 MiB in 1 MiB chunks); ${((performance.now() - t0) / 1e3).toFixed(0)} s in all\n`,
);
console.log(table(all, codecs.filter((k) => !k.sampled).map((k) => k.name)));
console.log(
  `\nzstd -3 on whole files (no chunks): ${mb(wholeFile3.stored)} MB (${pct(wholeFile3.stored, wholeFile3.raw)}); ` +
    `raw when < 10% saved: ${mb(wholeFile3.worth)} MB (${pct(wholeFile3.worth, wholeFile3.raw)})\n`,
);
console.log(`Sample: every ${sampleEvery}th member, ${mb(sampleRaw)} MB\n`);
console.log(table(sample, codecs.map((k) => k.name)));
