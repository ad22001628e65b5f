/**
 * Section "reread" (issue 15's last target): a file read again in the same
 * container after its lazy fetch must read at >= 0.95x overlay2's throughput.
 *
 * One image, built on the minbase image (docker build, --network none):
 *   /data/big        GEAR_BENCH_REREAD_BIG_MIB (128) MiB of random bytes
 *   /data/small/*    2,048 files of 8 KiB (16 MiB), random bytes
 * pushed as a Docker image and converted with gear convert into a registry on
 * loopback. Per system a fresh node (dockerd + overlay2, or dockerd + gear
 * daemon with an empty pool, optionally without FUSE passthrough), `docker
 * pull`, one idle container, and inside it (timed inside, as lib/read.ts does):
 *   first    the first read (gear: the lazy fetch; overlay2: the pulled layer)
 *   again    GEAR_BENCH_REREAD_REPS (5) reads of the same files in the same container
 *   new ctr  the same reads in a second container of the image (a new overlay mount)
 * of the big file (cat) and of the small files (find | xargs cat). The ratio
 * of the target is gear's median "again" throughput over overlay2's. All
 * nodes run at once and the samples alternate between the systems (order
 * rotating per repetition), so that the machine's load hits them alike.
 *
 * Systems (GEAR_BENCH_REREAD_SYSTEMS, default overlay2,gear,gear-pt,gear-nopt):
 * overlay2, gear (the default daemon: --fuse-open none since session 15, no
 * request per open, pages cached across opens), gear-pt (--fuse-open
 * passthrough: one request per open, reads of fetched files in the kernel),
 * gear-nopt (--fuse-open passthrough --no-fuse-passthrough: every read of a
 * file opened through the miss filesystem goes through the daemon),
 * gear-noopen (--fuse-open none given explicitly, as runs before session 15 named it),
 * gear-ctr (containerd 1.6 + gear snapshotter, ctr run + ctr task exec).
 * The daemon's miss-filesystem counters (gear_fuse_* of its --metrics-address:
 * requests by opcode, passthrough opens, READ bytes) are kept for the "again"
 * phase, to show which path the re-reads took.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI, startDockerd, type Dockerd } from '../../test/helpers/dockerd.js';
import { startGearContainerd, type GearContainerd } from '../../test/helpers/containerd.js';
import { buildImage, importMinbase, MINBASE_TAG } from '../../test/helpers/images.js';
import { runOk } from '../../test/helpers/proc.js';
import { freePort, startRegistry, type TestRegistry } from '../../test/helpers/registry.js';
import { log, nowS, type SectionContext } from './common.js';
import { median } from './stats.js';

export const REREAD_SYSTEMS = ['overlay2', 'gear', 'gear-pt', 'gear-nopt', 'gear-noopen', 'gear-ctr'] as const;
export type RereadSystem = (typeof REREAD_SYSTEMS)[number];

/** The daemon flags that make each gear system of the docker stack. */
const GEAR_SYSTEM_ARGS: Record<Exclude<RereadSystem, 'overlay2' | 'gear-ctr'>, string[]> = {
  gear: [],
  'gear-pt': ['--fuse-open', 'passthrough'],
  'gear-nopt': ['--fuse-open', 'passthrough', '--no-fuse-passthrough'],
  'gear-noopen': ['--fuse-open', 'none'],
};

const SMALL_FILES = 2048;
const SMALL_BYTES = 8192;

export const REREAD_TASKS = [
  { key: 'big', script: 'cat /data/big >/dev/null' },
  { key: 'small', script: 'find /data/small -type f -print0 | xargs -0 cat >/dev/null' },
] as const;
export type RereadTask = (typeof REREAD_TASKS)[number]['key'];

export interface RereadResult {
  bytes: Record<RereadTask, number>;
  files: Record<RereadTask, number>;
  systems: RereadSystem[];
  /** system → task → phase → seconds (again: one sample per repetition). */
  seconds: Partial<Record<RereadSystem, Record<RereadTask, { first: number; again: number[]; newCtr: number[] }>>>;
  /** system → task → miss-filesystem counters over the "again" phase (gear systems). */
  missCounters: Partial<Record<RereadSystem, Partial<Record<RereadTask, Record<string, number>>>>>;
  /** gear's median "again" throughput over overlay2's, per task and gear system. */
  ratios: Partial<Record<RereadSystem, Record<RereadTask, number>>>;
}

function listFromEnv(name: string): string[] | undefined {
  const v = process.env[name];
  return v ? v.split(',').map((x) => x.trim()).filter(Boolean) : undefined;
}

/** A container the reads run in: exec of a shell script, the seconds measured inside. */
interface Box {
  exec(script: string): Promise<number>;
  remove(): Promise<void>;
}

interface RereadNode {
  pull(ref: string): Promise<void>;
  start(ref: string): Promise<Box>;
  /** The gear daemon's /metrics (gear systems). */
  metricsUrl?: string;
  stop(): Promise<void>;
}

const wrap = (script: string) => `t0=$(date +%s%N); ${script}; rc=$?; t1=$(date +%s%N); echo "$rc $((t1-t0))"`;
function parseTimed(stdout: string, stderr: string): number {
  const [rc, ns] = stdout.trim().split('\n').pop()!.split(' ').map(Number);
  if (rc !== 0 || !Number.isFinite(ns)) throw new Error(`timed exec failed: ${stdout} ${stderr}`);
  return ns! / 1e9;
}

async function dockerNode(d: Dockerd, metricsUrl?: string): Promise<RereadNode> {
  return {
    ...(metricsUrl ? { metricsUrl } : {}),
    pull: async (ref) => void (await d.dockerOk(['pull', '-q', ref], { timeoutMs: 900_000 })),
    start: async (ref) => {
      const id = (await d.dockerOk(['run', '-d', '--network', 'none', ref, 'sleep', 'infinity'])).stdout.trim();
      return {
        exec: async (script) => {
          const r = await d.dockerOk(['exec', id, 'sh', '-c', wrap(script)], { timeoutMs: 600_000 });
          return parseTimed(r.stdout, r.stderr);
        },
        remove: async () => void (await d.docker(['rm', '-f', id])),
      };
    },
    stop: () => d.stop(),
  };
}

let seq = 0;
async function ctrNode(c: GearContainerd, metricsUrl: string): Promise<RereadNode> {
  return {
    metricsUrl,
    pull: async (ref) => void (await c.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 900_000)),
    start: async (ref) => {
      const id = `reread${process.pid}-${++seq}`;
      await c.ctrOk(['run', '-d', '--snapshotter', 'gear', ref, id, 'sleep', 'infinity'], 300_000);
      let e = 0;
      return {
        exec: async (script) => {
          const r = await c.ctr(['task', 'exec', '--exec-id', `x${++e}`, id, 'sh', '-c', wrap(script)], 600_000);
          if (r.code !== 0) throw new Error(`ctr task exec exited ${r.code}: ${r.stderr.slice(-2000)}`);
          return parseTimed(r.stdout, r.stderr);
        },
        remove: async () => {
          await c.ctr(['task', 'kill', '-s', 'KILL', id]);
          for (let i = 0; i < 50; i++) {
            if ((await c.ctr(['task', 'delete', id])).code === 0) break;
            await new Promise((res) => setTimeout(res, 100));
          }
          await c.ctr(['container', 'delete', id]);
        },
      };
    },
    stop: () => c.stop(),
  };
}

/** Waits (60 s at most) until the node's daemon has no download running or queued (gear_fetches_*). */
async function fetchesSettled(metricsUrl: string | undefined): Promise<void> {
  if (!metricsUrl) return;
  for (let i = 0; i < 240; i++) {
    try {
      const text = await (await fetch(metricsUrl, { signal: AbortSignal.timeout(10_000) })).text();
      const busy = /^gear_fetches_(in_flight|queued)\s+([0-9.e+-]+)$/gm;
      let n = 0;
      for (let m = busy.exec(text); m; m = busy.exec(text)) n += Number(m[2]);
      if (n === 0) return;
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The daemon's miss-filesystem counters (its Prometheus endpoint, gear_fuse_* series), by series name and labels. */
async function missCounters(metricsUrl: string | undefined): Promise<Record<string, number>> {
  if (!metricsUrl) return {};
  try {
    const r = await fetch(metricsUrl, { signal: AbortSignal.timeout(10_000) });
    const text = await r.text();
    const out: Record<string, number> = {};
    for (const line of text.split('\n')) {
      const m = /^(gear_fuse_\S+)\s+([0-9.e+-]+)$/.exec(line);
      if (m) out[m[1]!] = Number(m[2]);
    }
    return out;
  } catch {
    return {};
  }
}

const diff = (a: Record<string, number>, b: Record<string, number>): Record<string, number> =>
  Object.fromEntries(Object.keys(b).filter((k) => b[k] !== a[k]).map((k) => [k, b[k]! - (a[k] ?? 0)]));

/** Builds the reread image in d (overlay2 dockerd): minbase + one layer of /data. */
export async function buildRereadImage(d: Dockerd, tag: string, bigMiB: number): Promise<void> {
  if ((await d.docker(['image', 'inspect', '-f', '{{.Id}}', MINBASE_TAG])).code !== 0) await importMinbase(d);
  const small = SMALL_FILES * SMALL_BYTES;
  await buildImage(
    d,
    tag,
    `FROM ${MINBASE_TAG}\nRUN mkdir -p /data/small && head -c ${bigMiB}M /dev/urandom >/data/big && head -c ${small} /dev/urandom | split -b ${SMALL_BYTES} -a 4 - /data/small/f\nCMD ["sleep", "infinity"]\n`,
  );
}

export async function rereadSection(ctx: SectionContext): Promise<void> {
  const { report, pair } = ctx;
  const want = listFromEnv('GEAR_BENCH_REREAD_SYSTEMS') ?? ['overlay2', 'gear', 'gear-pt', 'gear-nopt'];
  const bad = want.filter((s) => !(REREAD_SYSTEMS as readonly string[]).includes(s));
  if (bad.length) throw new Error(`GEAR_BENCH_REREAD_SYSTEMS: unknown ${bad.join(', ')} (have ${REREAD_SYSTEMS.join(', ')})`);
  const systems = REREAD_SYSTEMS.filter((s) => want.includes(s));
  if (!systems.includes('overlay2')) throw new Error('reread: overlay2 is the reference: keep it in GEAR_BENCH_REREAD_SYSTEMS');
  const reps = Number(process.env.GEAR_BENCH_REREAD_REPS ?? '5');
  const bigMiB = Number(process.env.GEAR_BENCH_REREAD_BIG_MIB ?? '128');
  if (!Number.isInteger(reps) || reps < 1) throw new Error('GEAR_BENCH_REREAD_REPS: want an integer >= 1');
  if (!Number.isInteger(bigMiB) || bigMiB < 1 || bigMiB > 4096) throw new Error('GEAR_BENCH_REREAD_BIG_MIB: want 1..4096');
  const tag = `gear-bench/reread:${bigMiB}m`;
  const work = mkdtempSync('/tmp/gear-bench-reread-');
  let registry: TestRegistry | undefined;
  const result: RereadResult = {
    bytes: { big: bigMiB << 20, small: SMALL_FILES * SMALL_BYTES },
    files: { big: 1, small: SMALL_FILES },
    systems: [...systems],
    seconds: {},
    missCounters: {},
    ratios: {},
  };
  try {
    registry = await startRegistry();
    const reg = registry.host;
    if ((await pair.overlay2.docker(['image', 'inspect', '-f', '{{.Id}}', tag])).code !== 0) await buildRereadImage(pair.overlay2, tag, bigMiB);
    const archive = join(work, 'reread.tar');
    await pair.overlay2.dockerOk(['save', '-o', archive, tag], { timeoutMs: 600_000 });
    const refs = { docker: `${reg}/bench/reread:docker`, gear: `${reg}/bench/reread:gear` };
    await runOk('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `docker-archive:${archive}`, `docker://${refs.docker}`], { timeoutMs: 900_000 });
    const t0 = nowS();
    await runOk(process.execPath, [GEAR_CLI, 'convert', '--no-progress', '--json', '--insecure-registry', reg, `docker-archive:${archive}`, refs.gear], { timeoutMs: 900_000 });
    log(`reread: published ${tag} (gear convert ${(nowS() - t0).toFixed(1)} s)`);
    rmSync(archive, { force: true });

    // Every node up at once, so that the samples of the systems alternate (the order rotating per
    // repetition, as the other sections do): a busy moment of the machine hits them all alike.
    const nodes = new Map<RereadSystem, RereadNode>();
    const boxes = new Map<RereadSystem, Box>();
    try {
      for (const s of systems) {
        const port = await freePort();
        const metrics = ['--metrics-address', `127.0.0.1:${port}`];
        const metricsUrl = `http://127.0.0.1:${port}/metrics`;
        if (s === 'gear-ctr') {
          nodes.set(s, await ctrNode(await startGearContainerd({ namespace: 'bench', gearLogLevel: 'info', gearArgs: ['--insecure-registry', reg, ...metrics] }), metricsUrl));
        } else {
          const d = await startDockerd({
            driver: s === 'overlay2' ? 'overlay2' : 'gear',
            dockerdArgs: ['--insecure-registry', reg],
            ...(s === 'overlay2' ? {} : { gearArgs: ['--insecure-registry', reg, ...metrics, ...GEAR_SYSTEM_ARGS[s]] }),
          });
          nodes.set(s, await dockerNode(d, s === 'overlay2' ? undefined : metricsUrl));
        }
        const n = nodes.get(s)!;
        const ref = s === 'overlay2' ? refs.docker : refs.gear;
        await n.pull(ref);
        boxes.set(s, await n.start(ref));
        result.seconds[s] = Object.fromEntries(REREAD_TASKS.map((t) => [t.key, { first: NaN, again: [], newCtr: [] }])) as unknown as Record<
          RereadTask,
          { first: number; again: number[]; newCtr: number[] }
        >;
        if (n.metricsUrl) result.missCounters[s] = {};
      }
      const order = (rep: number) => systems.map((_, i) => systems[(i + rep) % systems.length]!);
      for (const t of REREAD_TASKS) {
        for (const s of systems) {
          result.seconds[s]![t.key].first = await boxes.get(s)!.exec(t.script);
          // Its downloads (a big file's assembly into the pool goes on after the read) end before the
          // next node's first read: that read once shared the machine with them, so the last node
          // (then gear-noopen) read the big file at 112-113 MB/s where it reads 122-124 alone (session 14).
          await fetchesSettled(nodes.get(s)!.metricsUrl);
        }
        const c0 = new Map<RereadSystem, Record<string, number>>();
        for (const s of systems) c0.set(s, await missCounters(nodes.get(s)!.metricsUrl));
        for (let rep = 0; rep < reps; rep++) for (const s of order(rep)) result.seconds[s]![t.key].again.push(await boxes.get(s)!.exec(t.script));
        for (const s of systems) if (nodes.get(s)!.metricsUrl) result.missCounters[s]![t.key] = diff(c0.get(s)!, await missCounters(nodes.get(s)!.metricsUrl));
      }
      // A new container of the image (a new overlay mount): gear's files are found in the pool.
      for (const s of systems) {
        await boxes.get(s)!.remove();
        boxes.delete(s);
        boxes.set(s, await nodes.get(s)!.start(s === 'overlay2' ? refs.docker : refs.gear));
      }
      for (const t of REREAD_TASKS) {
        for (const s of systems) await boxes.get(s)!.exec(t.script); // its first read (page cache, pool lookups)
        for (let rep = 0; rep < Math.min(reps, 3); rep++) for (const s of order(rep)) result.seconds[s]![t.key].newCtr.push(await boxes.get(s)!.exec(t.script));
      }
    } finally {
      for (const b of boxes.values()) await b.remove().catch(() => {});
      for (const n of nodes.values()) await n.stop().catch(() => {});
    }
    const mbps = (t: RereadTask, secs: number) => (result.bytes[t] / secs / 1e6).toFixed(0);
    for (const s of systems) {
      const per = result.seconds[s]!;
      log(
        `reread ${s}: ` +
          REREAD_TASKS.map((t) => `${t.key} first ${mbps(t.key, per[t.key].first)} MB/s, again ${mbps(t.key, median(per[t.key].again))} MB/s, new ctr ${mbps(t.key, median(per[t.key].newCtr))} MB/s`).join('; ') +
          (result.missCounters[s] ? ` | miss fs during the re-reads: ${JSON.stringify(result.missCounters[s])}` : ''),
      );
    }
    const o2 = result.seconds.overlay2!;
    for (const s of systems) {
      if (s === 'overlay2' || !result.seconds[s]) continue;
      const g = result.seconds[s]!;
      result.ratios[s] = Object.fromEntries(REREAD_TASKS.map((t) => [t.key, median(o2[t.key].again) / median(g[t.key].again)])) as Record<RereadTask, number>;
      for (const t of REREAD_TASKS) {
        report.add({
          section: 'reread',
          name: `reread ${t.key}${s === 'gear' ? '' : ` (${s})`}: again, same ctr`,
          unit: 's',
          higherIsBetter: false,
          samples: { overlay2: o2[t.key].again, gear: g[t.key].again },
          ...(s === 'gear' ? { target: 0.95 } : {}),
          description: `${t.script} (${result.files[t.key]} files, ${result.bytes[t.key]} bytes) again in the container that read it first (gear: after its lazy fetch); ratio = throughput ${s}/overlay2 (issue 15 target >= 0.95x)`,
        });
      }
    }
    report.extra.reread = result;
    report.tables.push({ title: 'reread: throughput of a second read in the same container (issue 15)', text: rereadTable(result) });
  } finally {
    if (registry) await registry.stop();
    rmSync(work, { recursive: true, force: true });
  }
}

export function rereadTable(r: RereadResult): string {
  const rows: string[][] = [['MB/s (median)', ...r.systems.flatMap((s) => REREAD_TASKS.map((t) => `${s} ${t.key}`))]];
  for (const phase of ['first', 'again', 'newCtr'] as const) {
    rows.push([
      phase === 'newCtr' ? 'new container' : phase === 'again' ? 'again, same container' : 'first read',
      ...r.systems.flatMap((s) =>
        REREAD_TASKS.map((t) => {
          const x = r.seconds[s]?.[t.key];
          if (!x) return '-';
          const secs = phase === 'first' ? x.first : median(x[phase]);
          return (r.bytes[t.key] / secs / 1e6).toFixed(0);
        }),
      ),
    ]);
  }
  rows.push(['ratio to overlay2 (again)', ...r.systems.flatMap((s) => REREAD_TASKS.map((t) => (r.ratios[s]?.[t.key] !== undefined ? `${r.ratios[s]![t.key].toFixed(2)}x` : '-')))]);
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((x) => (x[c] ?? '').length)));
  return rows.map((x) => x.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  ')).join('\n');
}
