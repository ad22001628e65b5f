/**
 * Section "series" (issue 11 item 5, issue 15's series targets): five
 * successive versions of one app, each built as a normal Docker image is
 * (docker build, GEAR_BENCH_SERIES_MODE): `stack` (default) builds each
 * version FROM the previous one plus one new layer holding what changed (the
 * whole dir of each added or upgraded package, as pip rewrites it, and the
 * app); `rebuild` builds each on the python3 base with one "pip install -r
 * requirements" layer holding every package of the version (Docker's cache
 * rebuilds it whenever a requirement changes), then the app. Published three
 * ways into one repository per system, version after version:
 *
 *   overlay2  the Docker images (skopeo, gzip layers): the base layer is shared
 *   gear      gear convert of each version in turn into the same repository
 *             (with --dedup-with the previous version when the CLI has it)
 *   estargz   ctr-remote image convert --estargz --oci of each version
 *
 * The versions (offline: numpy and its files come from the cached numpy
 * rootfs, /var/cache/gear-test/numpy-bookworm.tar; mylib and newlib are
 * generated pure-Python packages, deterministic):
 *   v1  numpy 1.24.2 (its files, as data: the app does not import it), mylib 1.0, app 1
 *   v2  mylib upgraded to 1.1 (a fifth of its modules changed), app 2
 *   v3  newlib 0.1 added
 *   v4  numpy "upgraded" (a tenth of its .py files changed)
 *   v5  newlib 0.2 (half of it changed), app 3
 *
 * Reported: registry storage (unique blobs reachable from the tags of v1..vk,
 * lib/registry-storage.ts) per system after k = 1..5 versions, gear convert
 * seconds and uncompressed input per version, and the warm second version:
 * on one fresh node per system v1 is deployed, then v2 (bytes received for
 * v2, over a veth, no shaping), against a cold overlay2 deploy of v2 on an
 * empty node (issue 15: gear <= 2% of it).
 *
 * Environment: GEAR_BENCH_SERIES_SYSTEMS (overlay2,gear,estargz),
 * GEAR_BENCH_SERIES_VERSIONS (5; fewer for a smoke run), GEAR_BENCH_SERIES_MODE
 * (stack: each version FROM the previous one plus a layer of what changed, the
 * default; rebuild: each version rebuilds its pip layer on the base, see
 * writeVersionContext).
 */
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI, startDockerd, type Dockerd } from '../../test/helpers/dockerd.js';
import { runOk } from '../../test/helpers/proc.js';
import { archiveInputBytes } from './archive.js';
import { NsRegistry } from './cold-deploy.js';
import { log, nowS, type SectionContext } from './common.js';
import { estargzMissing, publishEstargz, startStargzNode } from './estargz.js';
import { ensureDebianRootfs, importPythonBase, PY_BASE } from './images.js';
import { ShapedLink } from './netns.js';
import { storageOf, type Storage } from './registry-storage.js';

export const SERIES_SYSTEMS = ['overlay2', 'gear', 'estargz'] as const;
export type SeriesSystem = (typeof SERIES_SYSTEMS)[number];

const TAG_PREFIX: Record<SeriesSystem, string> = { overlay2: 'docker', gear: 'gear', estargz: 'esgz' };
const SITE = '/usr/local/lib/python3.11/dist-packages';

/** A small deterministic PRNG (mulberry32). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const WORDS =
  'data value result index buffer count total item node path name field record table column shape array config state cache handle parse format encode decode stream batch window scale offset limit order group merge split filter reduce map apply'.split(
    ' ',
  );

/** A valid Python module of about `bytes` bytes: functions with docstrings, seeded. */
function pyModule(seed: number, bytes: number): string {
  const r = prng(seed);
  const w = () => WORDS[Math.floor(r() * WORDS.length)]!;
  const out: string[] = [`"""${w()} ${w()} helpers (generated, seed ${seed})."""`, 'import math', ''];
  let n = 0;
  while (out.join('\n').length < bytes) {
    const name = `${w()}_${w()}_${n++}`;
    out.push(`def ${name}(${w()}, ${w()}_arg=${Math.floor(r() * 100)}):`);
    out.push(`    """Return the ${w()} of ${w()} for ${w()} ${w()} and ${w()} ${w()}."""`);
    out.push(`    x = (${Math.floor(r() * 1000)} + ${Math.floor(r() * 1000)}) % ${Math.floor(r() * 97) + 3}`);
    out.push(`    return math.floor(x * ${r().toFixed(4)})`, '');
  }
  return out.join('\n') + '\n';
}

/**
 * A generated package dir: `files` modules, module i seeded with `seed + i`
 * unless i is among the changed ones (seeded with changedSeed + i): an upgrade
 * changes some modules and keeps the rest byte for byte.
 */
function writePackage(dir: string, name: string, version: string, files: number, seed: number, changed: (i: number) => boolean, changedSeed: number): void {
  const pkg = join(dir, name);
  mkdirSync(pkg, { recursive: true });
  const mods: string[] = [];
  for (let i = 0; i < files; i++) {
    const s = changed(i) ? changedSeed + i : seed + i;
    const size = 2000 + Math.floor(prng(s)() * 20000);
    writeFileSync(join(pkg, `mod${i}.py`), pyModule(s, size));
    mods.push(`mod${i}`);
  }
  writeFileSync(join(pkg, '__init__.py'), `__version__ = ${JSON.stringify(version)}\nfrom . import ${mods.slice(0, 8).join(', ')}\n`);
  const info = join(dir, `${name}-${version}.dist-info`);
  mkdirSync(info, { recursive: true });
  writeFileSync(join(info, 'METADATA'), `Metadata-Version: 2.1\nName: ${name}\nVersion: ${version}\n`);
  writeFileSync(join(info, 'RECORD'), mods.map((m) => `${name}/${m}.py,,\n`).join(''));
}

// numpy is in the pip layer as data only: Debian's numpy build links the system BLAS, which the python3
// base image does not have (a wheel would bundle it); the app imports the pure-Python packages.
const appScript = (v: number, extra: string[]) =>
  [
    'import json, sqlite3, mylib',
    ...extra.map((m) => `import ${m}`),
    'db = sqlite3.connect(":memory:")',
    'db.execute("create table t (x integer)")',
    'db.executemany("insert into t values (?)", [(i,) for i in range(1000)])',
    `print(json.dumps({"app": ${v}, "mylib": mylib.__version__, "sum": db.execute("select sum(x) from t").fetchone()[0]}))`,
    '',
  ].join('\n');

interface VersionSpec {
  mylib: [string, number]; // version, changed-seed (0: original)
  newlib?: [string, number];
  numpyPatched: boolean;
  app: number;
}

const VERSIONS: VersionSpec[] = [
  { mylib: ['1.0', 0], numpyPatched: false, app: 1 },
  { mylib: ['1.1', 500_000], numpyPatched: false, app: 2 },
  { mylib: ['1.1', 500_000], newlib: ['0.1', 0], numpyPatched: false, app: 2 },
  { mylib: ['1.1', 500_000], newlib: ['0.1', 0], numpyPatched: true, app: 2 },
  { mylib: ['1.1', 500_000], newlib: ['0.2', 700_000], numpyPatched: true, app: 3 },
];

export type SeriesMode = 'stack' | 'rebuild';

/**
 * The build context of version v (1-based) under dir: site/ (the packages this version's pip layer
 * writes) and app/.
 *   stack    v1 = base + pip layer (numpy, mylib 1.0) + app; vk = FROM v(k-1) + one layer with what
 *            changed (the whole dir of each added or upgraded package, as pip install --upgrade
 *            rewrites it) + the app when it changed: "a new layer on top of the previous version"
 *   rebuild  vk = base + one pip layer with every package of vk + app (requirements.txt changed, so
 *            Docker's cache rebuilds that layer from scratch)
 */
async function writeVersionContext(dir: string, v: number, numpySrc: string, mode: SeriesMode): Promise<void> {
  const spec = VERSIONS[v - 1]!;
  const prev = v > 1 ? VERSIONS[v - 2] : undefined;
  const whole = mode === 'rebuild' || !prev;
  const site = join(dir, 'site');
  mkdirSync(site, { recursive: true });
  if (whole || spec.numpyPatched !== prev!.numpyPatched) {
    cpSync(join(numpySrc, 'numpy'), join(site, 'numpy'), { recursive: true });
    cpSync(join(numpySrc, 'numpy-1.24.2.egg-info'), join(site, 'numpy-1.24.2.egg-info'), { recursive: true });
  }
  if (spec.numpyPatched && (whole || !prev!.numpyPatched)) {
    // An upgrade that changes a tenth of the Python files (sorted order, every tenth), the binaries kept.
    const files = execFileSync('find', [join(site, 'numpy'), '-name', '*.py', '-type', 'f'], { encoding: 'utf8' }).split('\n').filter(Boolean).sort();
    files.forEach((f, i) => {
      if (i % 10 === 0) execFileSync('sh', ['-c', 'printf "\\n# patched in 1.24.3\\n" >> "$1"', 'sh', f]);
    });
  }
  const [mv, mseed] = spec.mylib;
  if (whole || mv !== prev!.mylib[0]) writePackage(site, 'mylib', mv, 120, 1000, (i) => mseed !== 0 && i % 5 === 0, mseed);
  if (spec.newlib && (whole || spec.newlib[0] !== prev!.newlib?.[0])) {
    const [nv, nseed] = spec.newlib;
    writePackage(site, 'newlib', nv, 60, 200_000, (i) => nseed !== 0 && i % 2 === 0, nseed);
  }
  const appChanged = whole || spec.app !== prev!.app || !!spec.newlib !== !!prev!.newlib;
  mkdirSync(join(dir, 'app'), { recursive: true });
  if (appChanged) writeFileSync(join(dir, 'app', 'app.py'), appScript(spec.app, spec.newlib ? ['newlib'] : []));
  const from = whole ? PY_BASE : `gear-bench/series-${mode}:v${v - 1}`;
  writeFileSync(
    join(dir, 'Dockerfile'),
    `FROM ${from}\nCOPY site/ ${SITE}/\n${appChanged ? 'COPY app/ /app/\n' : ''}CMD ["python3", "/app/app.py"]\n`,
  );
}

export interface SeriesResult {
  mode: SeriesMode;
  versions: number;
  systems: SeriesSystem[];
  /** system → storage after 1..k versions. */
  storage: Partial<Record<SeriesSystem, Storage[]>>;
  convert: { version: number; seconds: number; inputBytes: number; summary?: unknown }[];
  estargzConvert: { version: number; seconds: number }[];
  /** Bytes received: v1 cold and v2 after v1 per system; overlay2's v2 cold on an empty node. */
  deploys: Partial<Record<SeriesSystem, { v1Rx: number; v2WarmRx: number; v1S: number; v2WarmS: number }>>;
  warm?: { gearV2Rx?: number; overlay2ColdV2Rx?: number };
}

function listFromEnv(name: string): string[] | undefined {
  const v = process.env[name];
  return v ? v.split(',').map((x) => x.trim()).filter(Boolean) : undefined;
}

export async function seriesSection(ctx: SectionContext): Promise<void> {
  const { report, pair } = ctx;
  const want = listFromEnv('GEAR_BENCH_SERIES_SYSTEMS');
  if (want) {
    const bad = want.filter((s) => !(SERIES_SYSTEMS as readonly string[]).includes(s));
    if (bad.length) throw new Error(`GEAR_BENCH_SERIES_SYSTEMS: unknown ${bad.join(', ')} (have ${SERIES_SYSTEMS.join(', ')})`);
  }
  let systems = SERIES_SYSTEMS.filter((s) => !want || want.includes(s));
  if (systems.includes('estargz') && estargzMissing()) {
    if (want) throw new Error(`series: eStargz requested but ${estargzMissing()}`);
    report.note(`series: eStargz not measured: ${estargzMissing()}`);
    systems = systems.filter((s) => s !== 'estargz');
  }
  const n = Number(process.env.GEAR_BENCH_SERIES_VERSIONS ?? '5');
  const mode = (process.env.GEAR_BENCH_SERIES_MODE ?? 'stack') as SeriesMode;
  if (mode !== 'stack' && mode !== 'rebuild') throw new Error(`GEAR_BENCH_SERIES_MODE=${mode}: want stack or rebuild`);
  if (!Number.isInteger(n) || n < 2 || n > VERSIONS.length) throw new Error(`GEAR_BENCH_SERIES_VERSIONS=${n}: want 2..${VERSIONS.length}`);
  const work = mkdtempSync('/tmp/gear-bench-series-');
  const link = new ShapedLink();
  const registry = new NsRegistry(link, join(work, 'registry'));
  const result: SeriesResult = { mode, versions: n, systems: [...systems], storage: {}, convert: [], estargzConvert: [], deploys: {} };
  const stops: (() => Promise<void>)[] = [];
  try {
    await link.create();
    await registry.start();
    const reg = registry.host;
    const repo = `${reg}/bench/series`;
    const ref = (s: SeriesSystem, v: number) => `${repo}:${TAG_PREFIX[s]}-v${v}`;
    // numpy's files from the cached numpy rootfs (offline).
    const numpyTar = await ensureDebianRootfs('numpy', ['python3', 'python3-numpy']);
    const numpySrc = join(work, 'numpy-src');
    mkdirSync(numpySrc, { recursive: true });
    await runOk('tar', ['-xf', numpyTar, '-C', numpySrc, '--strip-components=5', './usr/lib/python3/dist-packages/numpy', './usr/lib/python3/dist-packages/numpy-1.24.2.egg-info'], {
      timeoutMs: 300_000,
    });
    await importPythonBase(pair.overlay2);
    const convertHelp = (await runOk(process.execPath, [GEAR_CLI, 'convert', '--help'])).stdout;
    const dedupWith = convertHelp.includes('--dedup-with');
    if (!dedupWith) report.note('series: gear convert has no --dedup-with: each version converted on its own into the same repository');
    for (let v = 1; v <= n; v++) {
      const ctxDir = join(work, `v${v}`);
      await writeVersionContext(ctxDir, v, numpySrc, mode);
      const tag = `gear-bench/series-${mode}:v${v}`;
      await pair.overlay2.dockerOk(['build', '--network=none', '-q', '-t', tag, ctxDir], { timeoutMs: 900_000 });
      rmSync(ctxDir, { recursive: true, force: true });
      const archive = join(work, `v${v}.tar`);
      await pair.overlay2.dockerOk(['save', '-o', archive, tag], { timeoutMs: 600_000 });
      const inputBytes = await archiveInputBytes(archive);
      if (systems.includes('overlay2')) {
        await runOk('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `docker-archive:${archive}`, `docker://${ref('overlay2', v)}`], { timeoutMs: 900_000 });
      }
      const line = [`series v${v}: ${(inputBytes / 1e6).toFixed(0)} MB of layers`];
      if (systems.includes('gear')) {
        const t0 = nowS();
        const conv = await runOk(
          process.execPath,
          [
            GEAR_CLI,
            'convert',
            '--no-progress',
            '--json',
            '--concurrency',
            '16',
            '--insecure-registry',
            reg,
            ...(dedupWith && v > 1 ? ['--dedup-with', ref('gear', v - 1)] : []),
            `docker-archive:${archive}`,
            ref('gear', v),
          ],
          { timeoutMs: 900_000 },
        );
        const seconds = nowS() - t0;
        let summary: unknown = conv.stdout.trim();
        try {
          summary = JSON.parse(conv.stdout);
        } catch {
          /* keep text */
        }
        result.convert.push({ version: v, seconds, inputBytes, summary });
        line.push(`gear convert ${seconds.toFixed(1)} s (${(inputBytes / seconds / 1e6).toFixed(1)} MB/s)`);
      }
      if (systems.includes('estargz')) {
        // ctr-remote converts from the registry: it needs the Docker image there.
        if (!systems.includes('overlay2')) {
          await runOk('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `docker-archive:${archive}`, `docker://${ref('overlay2', v)}`], { timeoutMs: 900_000 });
        }
        const e = await publishEstargz(ref('overlay2', v), ref('estargz', v), undefined, [], [reg]);
        result.estargzConvert.push({ version: v, seconds: e.convertSeconds });
        line.push(`estargz convert ${e.convertSeconds.toFixed(1)} s`);
      }
      rmSync(archive, { force: true });
      for (const s of systems) {
        const st = await storageOf(
          reg,
          Array.from({ length: v }, (_, i) => ['bench/series', `${TAG_PREFIX[s]}-v${i + 1}`] as [string, string]),
          s === 'gear',
        );
        (result.storage[s] ??= []).push(st);
        line.push(`${s} ${(st.bytes / 1e6).toFixed(1)} MB`);
      }
      log(line.join(', '));
    }

    // The warm second version: v1 then v2 on one fresh node per system; overlay2's cold v2 on an empty node.
    const newNode = async (s: SeriesSystem) => {
      if (s === 'estargz') {
        const sn = await startStargzNode({ insecure: [reg], stargz: true });
        stops.push(() => sn.stop());
        return {
          deploy: async (r: string) => {
            await sn.ctrOk(['image', 'rpull', '--plain-http', r], 900_000);
            await sn.runTask(r, ['python3', '/app/app.py']);
          },
          stop: () => sn.stop(),
        };
      }
      const d: Dockerd = await startDockerd({ driver: s === 'overlay2' ? 'overlay2' : 'gear', dockerdArgs: ['--insecure-registry', reg], ...(s === 'gear' ? { gearArgs: ['--insecure-registry', reg] } : {}) });
      stops.push(() => d.stop());
      return {
        deploy: async (r: string) => {
          await d.dockerOk(['pull', '-q', r], { timeoutMs: 900_000 });
          await d.dockerOk(['run', '--rm', '--network', 'none', r], { timeoutMs: 900_000 });
        },
        stop: () => d.stop(),
      };
    };
    const measure = async (fn: () => Promise<void>) => {
      const rx0 = link.rxBytes();
      const t0 = nowS();
      await fn();
      return { rx: link.rxBytes() - rx0, s: nowS() - t0 };
    };
    for (const s of systems) {
      const node = await newNode(s);
      try {
        const a = await measure(() => node.deploy(ref(s, 1)));
        const b = await measure(() => node.deploy(ref(s, 2)));
        result.deploys[s] = { v1Rx: a.rx, v2WarmRx: b.rx, v1S: a.s, v2WarmS: b.s };
        log(`series deploy ${s}: v1 cold ${(a.rx / 1e6).toFixed(1)} MB ${a.s.toFixed(1)} s, then v2 ${(b.rx / 1e6).toFixed(2)} MB ${b.s.toFixed(1)} s`);
      } finally {
        await node.stop();
      }
    }
    if (systems.includes('overlay2')) {
      const node = await newNode('overlay2');
      try {
        const c = await measure(() => node.deploy(ref('overlay2', 2)));
        result.warm = { overlay2ColdV2Rx: c.rx, ...(result.deploys.gear ? { gearV2Rx: result.deploys.gear.v2WarmRx } : {}) };
        log(`series deploy overlay2: v2 cold ${(c.rx / 1e6).toFixed(1)} MB ${c.s.toFixed(1)} s`);
      } finally {
        await node.stop();
      }
    }
    report.extra.series = result;
    report.tables.push({ title: `version series (${n} versions of one app, ${mode === 'stack' ? 'each a new layer on the previous version' : 'the pip layer rebuilt per version'}; issue 11 item 5)`, text: seriesTable(result) });
  } finally {
    for (const stop of stops) await stop().catch(() => {});
    await registry.stop();
    await link.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}

export function seriesTable(r: SeriesResult): string {
  const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
  const rows: string[][] = [['registry storage after', ...r.systems, ...(r.systems.includes('overlay2') ? r.systems.filter((s) => s !== 'overlay2').map((s) => `${s}/overlay2`) : [])]];
  for (let k = 0; k < r.versions; k++) {
    const o2 = r.storage.overlay2?.[k]?.bytes;
    rows.push([
      `${k + 1} version${k ? 's' : ''}`,
      ...r.systems.map((s) => (r.storage[s]?.[k] ? mb(r.storage[s]![k]!.bytes) : '-')),
      ...(o2 ? r.systems.filter((s) => s !== 'overlay2').map((s) => (r.storage[s]?.[k] ? `${((100 * r.storage[s]![k]!.bytes) / o2).toFixed(0)}%` : '-')) : []),
    ]);
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((x) => (x[c] ?? '').length)));
  const out = rows.map((x) => x.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  '));
  for (const c of r.convert) {
    // What the converter says it uploaded and reused (its --json summary; the keys differ between format versions).
    const sum = c.summary && typeof c.summary === 'object' ? (c.summary as Record<string, unknown>) : {};
    const extra = ['bytesUploaded', 'bytesSkipped', 'reusedFiles', 'reusedBytes']
      .filter((k) => typeof sum[k] === 'number')
      .map((k) => `${k} ${k.toLowerCase().includes('bytes') ? mb(sum[k] as number) : String(sum[k])}`);
    out.push(`gear convert v${c.version}: ${c.seconds.toFixed(1)} s for ${mb(c.inputBytes)} of layers (${(c.inputBytes / c.seconds / 1e6).toFixed(1)} MB/s)${extra.length ? `; ${extra.join(', ')}` : ''}`);
  }
  for (const c of r.estargzConvert) out.push(`estargz convert v${c.version}: ${c.seconds.toFixed(1)} s`);
  for (const [s, d] of Object.entries(r.deploys)) out.push(`deploy ${s}: v1 cold ${mb(d.v1Rx)} in ${d.v1S.toFixed(1)} s, then v2 on the same node ${mb(d.v2WarmRx)} in ${d.v2WarmS.toFixed(1)} s`);
  if (r.warm?.overlay2ColdV2Rx) {
    out.push(`overlay2 v2 cold on an empty node: ${mb(r.warm.overlay2ColdV2Rx)}`);
    if (r.warm.gearV2Rx !== undefined) out.push(`warm gear v2: ${((100 * r.warm.gearV2Rx) / r.warm.overlay2ColdV2Rx).toFixed(2)}% of it (issue 15 target <= 2%)`);
  }
  return out.join('\n');
}
