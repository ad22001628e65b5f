/**
 * Section "cold-deploy" (issues 6 and 11): deploy on an empty node, Docker
 * images on overlay2 vs Gear images on gear vs eStargz images on the stargz
 * snapshotter (the systems of lib/systems.ts, bench/README.md), through a link
 * we shape ourselves.
 *
 * - A registry (docker-registry 2.8) runs inside a network namespace created
 *   for the run, reachable over a veth pair. Links: 'unshaped' (veth at full
 *   speed, the loopback-like case), '100mbit' (100 Mbit/s down, 20 up) and
 *   '20mbit' (20 down, 5 up) with tc tbf on the veth ends, and 'rtt20ms'
 *   (unshaped, plus 10 ms each way through a TCP delay proxy in the namespace
 *   in front of the registry: this kernel has no netem; no target).
 * - Images (lib/images.ts): busybox, minbase, a python app in two versions,
 *   a perl app, nginx; pushed as Docker images (skopeo, gzip layers) and
 *   converted to Gear images (gear convert, default storage) into the same
 *   registry. Each Gear image then gets its prefetch list the way a maintainer
 *   makes one: its task runs once on a fresh gear node, and `gear prefetch
 *   --from-pool` publishes the files that run opened (GEAR_BENCH_PREFETCH=0:
 *   no list, purely lazy).
 * - One sample: a fresh dockerd (and for gear a fresh gear daemon with an empty
 *   pool) per image, `docker pull` + `docker run --rm` of the image's task;
 *   seconds, and bytes received over the veth (IP headers included). The
 *   python app's second version is then deployed on the same node (gear: warm
 *   pool; overlay2: its base layer already there). For minbase on the 100mbit
 *   link also the first full read of every file (8 parallel readers; gear:
 *   fetches what the task did not), then warm full reads in the same and in a
 *   new container.
 * - Summary rows: geometric mean over the images of the cold pull+run time and
 *   of the bytes received, per link; at 100 Mbit/s with the issue's targets
 *   (deploy >= 6x faster, bytes <= 20% of overlay2's: ratio >= 5x), and the
 *   second version's bytes on a warm gear node against a cold overlay2 deploy
 *   of it (<= 5%: ratio >= 20x).
 * - Every system deploys an image back to back, the order rotating per
 *   repetition (the side-by-side table, lib/systems.ts; the rows below keep
 *   overlay2 vs gear-opt, or gear with GEAR_BENCH_PREFETCH=0). GEAR_BENCH_COLD_REPS
 *   (default 2) repetitions on unshaped and 100mbit, GEAR_BENCH_COLD_SLOW_REPS
 *   (default 1) on 20mbit and rtt20ms; GEAR_BENCH_COLD_LINKS and
 *   GEAR_BENCH_COLD_IMAGES (comma lists) select a subset; GEAR_BENCH_COLD_SYSTEMS
 *   (comma list) the systems; GEAR_BENCH_COLD_DRIVERS=gear (older spelling)
 *   deploys gear's side only (no ratios: for comparing two versions of gear).
 *
 * GEAR_BENCH_COLD=auto skips the section (with a note) when the lazy path
 * does not work end to end: the first Gear deploy fails or the daemon reports
 * 'Lazy Pull' off.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, copyFileSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI, startDockerd, type Dockerd } from '../../test/helpers/dockerd.js';
import { runOk, stopChild } from '../../test/helpers/proc.js';
import { log, nowS, type SectionContext } from './common.js';
import { BENCH_IMAGES, type BenchImage } from './images.js';
import { ShapedLink, withLoopbackNetns, type Shape } from './netns.js';
import { startGearContainerd, type GearContainerd } from '../../test/helpers/containerd.js';
import { formatProfile, gearRequestProfile } from './profile.js';
import { READ_TASKS, timedExec, startIdle } from './read.js';
import { estargzMissing, publishEstargz, startStargzNode, type StargzNode } from './estargz.js';
import { AccessLog, storageOf, type Storage } from './registry-storage.js';
import { archiveInputBytes } from './archive.js';
import { isEstargz, isGear, isGearCtr, isGearOpt, storageTable, SYSTEMS, SystemSamples, systemOrder, systemsTable, type MetricKey, type PublishRow, type System } from './systems.js';

/** Where GEAR_BENCH_PROFILE=1 keeps each gear node's daemon log. */
const PROFILE_LOG_DIR = join(process.env.TMPDIR ?? '/tmp', 'gear-bench-logs');

interface LinkSpec {
  key: string;
  shape: Shape;
  /** Added delay each way (ms), through the delay proxy. */
  oneWayDelayMs?: number;
  /** Full-read measurements of minbase on this link. */
  readsToo: boolean;
  slow: boolean;
}

// The full reads after a deploy are bound by per-file fetch latency, not by the
// link (measured the same on both), so they run on the 100mbit link only.
const LINKS: LinkSpec[] = [
  { key: 'unshaped', shape: {}, readsToo: false, slow: false },
  { key: '100mbit', shape: { down: '100mbit', up: '20mbit' }, readsToo: true, slow: false },
  { key: '20mbit', shape: { down: '20mbit', up: '5mbit' }, readsToo: false, slow: true },
  { key: 'rtt20ms', shape: {}, oneWayDelayMs: 10, readsToo: false, slow: true },
];

/** Targets of issue 6 at 100 Mbit/s (ratios oriented so that > 1 = gear better). */
const TARGET_LINK = '100mbit';
const DEPLOY_TARGET = 6;
const BYTES_TARGET = 5; // gear <= 20% of overlay2's bytes
const WARM_BYTES_TARGET = 20; // gear <= 5%

const FULL_READ = READ_TASKS.find((t) => t.key === 'sha256-all')!;
const FIRST_READ = 'find / -xdev -type f -print0 | xargs -0 -P8 -n64 cat >/dev/null';
const REGISTRY_PORT = 5000;

function listFromEnv(name: string): string[] | undefined {
  const v = process.env[name];
  return v ? v.split(',').map((x) => x.trim()).filter(Boolean) : undefined;
}

function slowReps(): number {
  const v = Number(process.env.GEAR_BENCH_COLD_SLOW_REPS ?? '1');
  return Number.isInteger(v) && v >= 1 ? v : 1;
}

const geomean = (xs: number[]): number => Math.exp(xs.reduce((a, x) => a + Math.log(x), 0) / xs.length);

/** The bench's environment turns background fetch on for every Gear daemon it starts. */
function backgroundFetchOn(): boolean {
  return /^(1|true|yes|on)$/i.test((process.env.GEAR_BACKGROUND_FETCH ?? '').trim());
}

async function gearStatus(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  return Object.fromEntries(JSON.parse(r.stdout) as [string, string][]);
}

/** The registry inside the namespace, listening on addr:port. */
async function startNsRegistry(link: ShapedLink, dir: string, addr: string, port: number, accessLog: string): Promise<ChildProcess> {
  mkdirSync(join(dir, 'data'), { recursive: true });
  const cfg = join(dir, 'config.yml');
  writeFileSync(
    cfg,
    [
      'version: 0.1',
      'log:',
      '  level: error',
      '  accesslog:',
      '    disabled: false',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${join(dir, 'data')}`,
      'http:',
      `  addr: ${addr}:${port}`,
      '',
    ].join('\n'),
  );
  // `ip netns exec` execs the registry: the child pid is the registry's.
  // Its stdout is the access log (one line per request): the requests each deploy made.
  const fd = openSync(accessLog, 'a');
  const child = spawn('ip', ['netns', 'exec', link.ns, '/usr/bin/docker-registry', 'serve', cfg], { stdio: ['ignore', fd, 'ignore'] });
  closeSync(fd);
  child.on('error', () => {});
  await waitHttp(link, `${addr}:${port}`, child);
  return child;
}

/** Waits until GET /v2/ answers 200 at host (from inside the namespace when host is its loopback). */
async function waitHttp(link: ShapedLink, host: string, child: ChildProcess): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) break;
    const r = await runOk('ip', ['netns', 'exec', link.ns, 'bash', '-c', `exec 3<>/dev/tcp/${host.replace(':', '/')} && printf 'GET /v2/ HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3`]).catch(
      () => undefined,
    );
    if (r && r.stdout.includes(' 200')) return;
    await new Promise((res) => setTimeout(res, 100));
  }
  await stopChild(child, 5000);
  throw new Error(`${host} in ${link.ns} did not come up`);
}

/** The registry as the nodes see it (nsAddr:5000), directly or behind the delay proxy. */
export class NsRegistry {
  private registry: ChildProcess | undefined;
  private proxy: ChildProcess | undefined;
  private delay = 0;
  readonly accessLog: AccessLog;
  constructor(
    private readonly link: ShapedLink,
    private readonly dir: string,
  ) {
    mkdirSync(dir, { recursive: true });
    this.accessLog = new AccessLog(join(dir, 'access.log'));
  }

  get host(): string {
    return `${this.link.nsAddr}:${REGISTRY_PORT}`;
  }

  async start(oneWayDelayMs = 0): Promise<void> {
    if (this.registry && this.delay === oneWayDelayMs) return;
    await this.stop();
    this.delay = oneWayDelayMs;
    if (oneWayDelayMs === 0) {
      this.registry = await startNsRegistry(this.link, this.dir, this.link.nsAddr, REGISTRY_PORT, this.accessLog.file);
      return;
    }
    this.registry = await startNsRegistry(this.link, this.dir, '127.0.0.1', REGISTRY_PORT + 1, this.accessLog.file);
    const script = new URL('./delay-proxy.mjs', import.meta.url).pathname;
    this.proxy = spawn('ip', ['netns', 'exec', this.link.ns, process.execPath, script, this.host, `127.0.0.1:${REGISTRY_PORT + 1}`, String(oneWayDelayMs)], {
      stdio: 'ignore',
    });
    this.proxy.on('error', () => {});
    await waitHttp(this.link, this.host, this.proxy);
  }

  async stop(): Promise<void> {
    if (this.proxy) await stopChild(this.proxy, 5000);
    if (this.registry) await stopChild(this.registry, 10_000);
    this.proxy = this.registry = undefined;
  }
}

/** GEAR_BENCH_PREFETCH=0 deploys the Gear images without a prefetch list (purely lazy). */
const prefetchOn = (): boolean => process.env.GEAR_BENCH_PREFETCH !== '0';

/** Systems of this run: GEAR_BENCH_COLD_SYSTEMS, or GEAR_BENCH_COLD_DRIVERS (legacy), default all. */
function systemsFromEnv(report: SectionContext['report']): System[] {
  const want = listFromEnv('GEAR_BENCH_COLD_SYSTEMS');
  // Legacy GEAR_BENCH_COLD_DRIVERS=gear: gear's side only, with its prefetch list when prefetch is on.
  const drivers = listFromEnv('GEAR_BENCH_COLD_DRIVERS');
  let systems: System[];
  if (want) {
    const bad = want.filter((s) => !(SYSTEMS as readonly string[]).includes(s));
    if (bad.length) throw new Error(`GEAR_BENCH_COLD_SYSTEMS: unknown ${bad.join(', ')} (have ${SYSTEMS.join(', ')})`);
    systems = SYSTEMS.filter((s) => want.includes(s));
  } else if (drivers) {
    systems = drivers.map((d) => (d === 'gear' ? (prefetchOn() ? 'gear-opt' : 'gear') : 'overlay2'));
  } else {
    systems = SYSTEMS.filter((s) => s !== 'gear-opt' || prefetchOn());
  }
  if (systems.some(isEstargz)) {
    const why = estargzMissing();
    if (why) {
      if (want) throw new Error(`cold-deploy: eStargz requested but ${why}`);
      report.note(`cold-deploy: eStargz not measured: ${why}`);
      systems = systems.filter((s) => !isEstargz(s));
    }
  }
  return systems;
}

/** The tag of each system's copy of an image in bench/<image>. */
const TAGS: Record<System, string> = {
  overlay2: 'docker',
  gear: 'gear',
  'gear-opt': 'gear-opt',
  'gear-ctr': 'gear',
  'gear-opt-ctr': 'gear-opt',
  estargz: 'esgz',
  'estargz-opt': 'esgz-opt',
};

/** A deploy node: a fresh dockerd (overlay2 or gear) or a fresh containerd + stargz snapshotter. */
interface Node {
  pull(ref: string): Promise<void>;
  run(ref: string, task: string[]): Promise<void>;
  dockerd?: Dockerd;
  /** The gear snapshotter's and containerd's logs (gear-ctr nodes), kept under GEAR_BENCH_PROFILE=1. */
  ctrLogs?: { gear: string; containerd: string };
  stop(): Promise<void>;
}

export async function coldDeploySection(ctx: SectionContext): Promise<void> {
  const { cfg, report, pair } = ctx;
  if (cfg.cold === 'off') {
    report.note('cold-deploy skipped (GEAR_BENCH_COLD=off)');
    return;
  }
  const wantLinks = listFromEnv('GEAR_BENCH_COLD_LINKS');
  const wantImages = listFromEnv('GEAR_BENCH_COLD_IMAGES');
  const systems = systemsFromEnv(report);
  // The "gear" column of the overlay2-vs-gear rows (issue 6 targets): the Gear image as shipped, with its prefetch list when there is one.
  const legacyGear: System = systems.includes('gear-opt') ? 'gear-opt' : 'gear';
  const links = LINKS.filter((l) => !wantLinks || wantLinks.includes(l.key));
  const images = BENCH_IMAGES.filter((i) => !wantImages || wantImages.includes(i.key));
  const byKey = new Map(images.map((i) => [i.key, i] as const));
  const work = mkdtempSync('/tmp/gear-bench-cold-');
  const link = new ShapedLink();
  const registry = new NsRegistry(link, join(work, 'registry'));
  const nodes: Node[] = [];
  try {
    await link.create();
    await registry.start();
    const reg = registry.host;
    log(`cold-deploy: registry ${reg} in netns ${link.ns} (veth ${link.hostIf}/${link.nsIf}); images ${images.map((i) => i.key).join(', ')}; systems ${systems.join(', ')}`);

    // Publish every image every way, unshaped.
    const refs: Record<string, Record<System, string>> = {};
    const publish: Record<string, unknown> = {};
    const publishRows: PublishRow[] = [];
    const wantGear = systems.some(isGear);
    // The Gear images converted so far: each next image is converted with --dedup-with all of them, as a
    // maintainer publishing a family of images does (docs/format.md §10.3): a file already in a pack of the
    // corpus is referenced, not stored again (the registry shares the base layers of the Docker images alike).
    const converted: string[] = [];
    for (const img of images) {
      let t0 = nowS();
      await img.build(pair.overlay2);
      const buildS = nowS() - t0;
      const archive = join(work, `${img.key}.tar`);
      await pair.overlay2.dockerOk(['save', '-o', archive, img.tag], { timeoutMs: 600_000 });
      refs[img.key] = Object.fromEntries(SYSTEMS.map((s) => [s, `${reg}/bench/${img.key}:${TAGS[s]}`])) as Record<System, string>;
      const docker = refs[img.key]!.overlay2;
      const gear = refs[img.key]!.gear;
      const row: PublishRow = { image: img.key };
      t0 = nowS();
      await runOk('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `docker-archive:${archive}`, `docker://${docker}`], { timeoutMs: 900_000 });
      const pushS = nowS() - t0;
      let summary: unknown;
      let convertS: number | undefined;
      if (wantGear) {
        t0 = nowS();
        const conv = await runOk(
          process.execPath,
          [GEAR_CLI, 'convert', '--no-progress', '--json', '--concurrency', '16', '--insecure-registry', reg, ...converted.flatMap((c) => ['--dedup-with', c]), `docker-archive:${archive}`, gear],
          { timeoutMs: 900_000 },
        );
        converted.push(gear);
        convertS = row.gearConvertS = nowS() - t0;
        summary = conv.stdout.trim();
        try {
          summary = JSON.parse(conv.stdout);
        } catch {
          /* keep text */
        }
      }
      let prefetch: unknown;
      let prefetchS = 0;
      if (systems.some(isGearOpt)) {
        // What an image maintainer does once: run the task on a node whose pool is empty and
        // whose daemon runs without read-ahead (else the pool, and the list, also hold the pack
        // neighbours it brought along: pyapp-1 803 files instead of 81), then publish the files
        // it opened as the image's prefetch list (gear prefetch), here as a second tag
        // (gear-opt) so that `gear` stays purely lazy. GEAR_BENCH_RECORD_READ_AHEAD: another window.
        t0 = nowS();
        const recordReadAhead = process.env.GEAR_BENCH_RECORD_READ_AHEAD ?? '0';
        const rec = await startDockerd({ driver: 'gear', dockerdArgs: ['--insecure-registry', reg], gearArgs: ['--insecure-registry', reg], gearEnv: { GEAR_READ_AHEAD: recordReadAhead } });
        try {
          await rec.dockerOk(['pull', '-q', gear], { timeoutMs: 900_000 });
          await rec.dockerOk(['run', '--rm', '--network', 'none', gear, ...img.task], { timeoutMs: 900_000 });
          const r = await runOk(process.execPath, [GEAR_CLI, 'prefetch', '--json', '--insecure-registry', reg, '--from-pool', join(rec.gearRoot!, 'pool'), gear, refs[img.key]!['gear-opt']], {
            timeoutMs: 900_000,
          });
          prefetch = JSON.parse(r.stdout);
        } finally {
          await rec.stop();
        }
        prefetchS = row.gearPrefetchS = nowS() - t0;
      }
      let estargz: unknown;
      if (systems.some(isEstargz)) {
        const e = await publishEstargz(docker, refs[img.key]!.estargz, refs[img.key]!['estargz-opt'], img.task, [reg]);
        row.estargzConvertS = e.convertSeconds;
        row.estargzOptimizeS = e.optimizeSeconds;
        estargz = e;
        // optimize still writes an image when the task fails, with a poorer prefetch set: say so.
        if (e.optimizeTaskExit !== 0) report.note(`cold-deploy: ${img.key}: the task exited ${e.optimizeTaskExit ?? '(not logged)'} under ctr-remote image optimize; estargz-opt's prefetch set may be incomplete`);
      }
      // The uncompressed input of the conversion (the archive's layer tars): conversion MB/s (issue 15: >= 100).
      const inputBytes = (row.inputBytes = await archiveInputBytes(archive));
      publishRows.push(row);
      publish[img.key] = {
        inputBytes,
        refs: refs[img.key],
        buildSeconds: buildS,
        skopeoPushSeconds: pushS,
        ...(convertS !== undefined ? { gearConvertSeconds: convertS, convert: summary } : {}),
        ...(prefetch ? { prefetchSeconds: prefetchS, prefetch } : {}),
        ...(estargz ? { estargz } : {}),
      };
      rmSync(archive, { force: true });
      const pf = prefetch as { prefetch: number; files: number } | undefined;
      log(
        `cold-deploy: published ${img.key}: build ${buildS.toFixed(0)} s, docker push ${pushS.toFixed(1)} s` +
          (convertS !== undefined ? `, gear convert ${convertS.toFixed(1)} s (${(inputBytes / convertS / 1e6).toFixed(1)} MB/s of ${(inputBytes / 1e6).toFixed(0)} MB)` : '') +
          (pf ? `, recorded run + gear prefetch ${prefetchS.toFixed(1)} s (${pf.prefetch} of ${pf.files} files listed)` : '') +
          (row.estargzConvertS !== undefined ? `, estargz convert ${row.estargzConvertS.toFixed(1)} s, optimize ${row.estargzOptimizeS!.toFixed(1)} s` : ''),
      );
    }
    // Registry storage of each system's copy of the corpus (unique blobs, Gear files included).
    const storage: Partial<Record<System, Storage>> = {};
    // (gear-ctr and gear-opt-ctr deploy the same images as gear and gear-opt: counted under those names.)
    for (const s of new Set(systems.map((x): System => (x === 'gear-ctr' ? 'gear' : x === 'gear-opt-ctr' ? 'gear-opt' : x)))) {
      storage[s] = await storageOf(reg, images.map((i) => [`bench/${i.key}`, TAGS[s]] as [string, string]), isGear(s));
    }
    const storageText = storageTable(storage, publishRows);
    log(`cold-deploy: registry storage and conversion times:\n${storageText}`);
    report.extra['cold-deploy'] = {
      registry: reg,
      netns: link.ns,
      links,
      images: images.map(({ build: _b, ...i }) => i),
      systems,
      legacyGear,
      publish,
      storage,
      coldReps: cfg.coldReps,
      slowReps: slowReps(),
      prefetch: prefetchOn(),
    };

    const node = async (s: System): Promise<Node> => {
      if (isGearCtr(s)) {
        const c: GearContainerd = await startGearContainerd({ namespace: 'bench', gearLogLevel: cfg.profile ? 'debug' : 'info', gearArgs: ['--insecure-registry', reg] });
        let id = 0;
        const w: Node = {
          ctrLogs: c.logs,
          pull: async (ref) => void (await c.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 900_000)),
          run: async (ref, task) =>
            void (await withLoopbackNetns((ns) => c.ctrOk(['run', '--snapshotter', 'gear', '--rm', '--with-ns', `network:${ns}`, ref, `task${++id}`, ...task], 900_000))),
          stop: () => c.stop(),
        };
        nodes.push(w);
        return w;
      }
      if (isEstargz(s)) {
        const n: StargzNode = await startStargzNode({ insecure: [reg], stargz: true });
        const w: Node = {
          pull: async (ref) => void (await n.ctrOk(['image', 'rpull', '--plain-http', ref], 900_000)),
          run: async (ref, task) => void (await n.runTask(ref, task)),
          stop: () => n.stop(),
        };
        nodes.push(w);
        return w;
      }
      const driver = s === 'overlay2' ? 'overlay2' : 'gear';
      const d = await startDockerd({
        driver,
        dockerdArgs: ['--insecure-registry', reg],
        ...(driver === 'gear' ? { gearArgs: ['--insecure-registry', reg, ...(cfg.profile ? ['--log-level', 'debug'] : [])] } : {}),
      });
      const w: Node = {
        dockerd: d,
        pull: async (ref) => void (await d.dockerOk(['pull', '-q', ref], { timeoutMs: 900_000 })),
        run: async (ref, task) => void (await d.dockerOk(['run', '--rm', '--network', 'none', ref, ...task], { timeoutMs: 900_000 })),
        stop: () => d.stop(),
      };
      nodes.push(w);
      return w;
    };
    const release = async (n: Node) => {
      await n.stop();
      nodes.splice(nodes.indexOf(n), 1);
    };

    type Series = Record<System, number[]>;
    const empty = (): Series => Object.fromEntries(SYSTEMS.map((s) => [s, []])) as unknown as Series;
    const series = new Map<string, { name: string; unit: string; higherIsBetter: boolean; s: Series; description: string }>();
    const side = new SystemSamples();
    const put = (key: string, name: string, unit: string, d: System, v: number, description: string, higherIsBetter = false) => {
      if (!series.has(key)) series.set(key, { name, unit, higherIsBetter, s: empty(), description });
      series.get(key)!.s[d].push(v);
    };
    const gearStatuses: unknown[] = [];
    const failures: string[] = [];
    let probed = false;

    /** pull + run of img on n; records the series under `base`. */
    const deploy = async (n: Node, d: System, l: LinkSpec, img: BenchImage, base: string, what: string, sideKey: string): Promise<string> => {
      const ref = refs[img.key]![d];
      const rx0 = link.rxBytes();
      const mark = registry.accessLog.mark();
      const startWall = Date.now();
      const t0 = nowS();
      await n.pull(ref);
      const t1 = nowS();
      await n.run(ref, img.task);
      const t2 = nowS();
      const rx = link.rxBytes() - rx0;
      const req = registry.accessLog.since(mark);
      if (isGear(d) && !probed && n.dockerd) {
        const st = await gearStatus(n.dockerd);
        if (!/^on/.test(st['Lazy Pull'] ?? '')) throw new Error(`gear reports Lazy Pull '${st['Lazy Pull']}'`);
        probed = true;
      }
      if (cfg.profile) log(`profile: ${d} ${base}: pull ${new Date(startWall).toISOString()} → run ${new Date(startWall + (t1 - t0) * 1000).toISOString()} → done ${new Date(startWall + (t2 - t0) * 1000).toISOString()}`);
      const pullHow = isEstargz(d) ? 'ctr-remote image rpull' : isGearCtr(d) ? 'ctr image pull --snapshotter gear' : 'docker pull';
      const runHow = isEstargz(d) ? 'ctr run --snapshotter stargz --rm' : isGearCtr(d) ? 'ctr run --snapshotter gear --rm' : 'docker run --rm';
      put(`${base} deploy`, `${what}: pull+run`, 's', d, t2 - t0, `${pullHow} + ${runHow} ${img.task.join(' ')} over the ${l.key} link`);
      put(`${base} pull`, `  ${base}: pull`, 's', d, t1 - t0, `${pullHow} alone`);
      put(`${base} run`, `  ${base}: first run`, 's', d, t2 - t1, `first ${runHow} of the task (lazy fetches)`);
      put(`${base} rx`, `  ${base}: bytes received`, 'bytes', d, rx, 'bytes the node received over the veth during pull+run (IP headers included)');
      put(`${base} requests`, `  ${base}: registry requests`, 'n', d, req.requests, 'HTTP requests in the registry access log during pull+run');
      const values: Record<MetricKey, number> = { pull: t1 - t0, run: t2 - t1, deploy: t2 - t0, rx, requests: req.requests };
      for (const [k, v] of Object.entries(values)) side.add(l.key, sideKey, k as MetricKey, d, v);
      const bg = backgroundFetchOn() && isGear(d) && n.dockerd ? await completion(n.dockerd, d, base, rx0, mark, t2) : '';
      return `${d} ${(t2 - t0).toFixed(2)} s ${(rx / 1e6).toFixed(1)} MB ${req.requests} req${bg}`;
    };

    /**
     * GEAR_BACKGROUND_FETCH=on (the daemons inherit it): after the deploy, waits (5 min at most) until
     * the node's background fetch has completed the image, and records how long that took after the
     * task ended and what the node received and asked for in all (docs/lazy.md, "Background fetch").
     */
    const completion = async (n: Dockerd, d: System, base: string, rx0: number, mark: number, tDone: number): Promise<string> => {
      let st = '';
      for (let i = 0; i < 600; i++) {
        st = (await gearStatus(n))['Background Fetch'] ?? '';
        if (/^on: /.test(st) && !/running/.test(st)) break;
        await new Promise((r) => setTimeout(r, 500));
      }
      const after = nowS() - tDone;
      const rxAll = link.rxBytes() - rx0;
      const reqAll = registry.accessLog.since(mark).requests;
      put(`${base} bg-complete`, `  ${base}: background fetch done after the task`, 's', d, after, 'GEAR_BACKGROUND_FETCH=on: time from the end of the task until the image is complete in the pool (5 s quiet spell included)');
      put(`${base} bg-rx`, `  ${base}: bytes received, deploy + background fetch`, 'bytes', d, rxAll, 'bytes the node received from the pull until the image was complete');
      put(`${base} bg-requests`, `  ${base}: registry requests, deploy + background fetch`, 'n', d, reqAll, 'HTTP requests from the pull until the image was complete');
      return ` (background fetch: complete ${after.toFixed(1)} s after the task, ${(rxAll / 1e6).toFixed(1)} MB ${reqAll} req in all; ${st})`;
    };

    /** First full read, then warm reads in the same and in a new container (minbase). */
    const reads = async (n: Dockerd, d: System, ref: string, base: string): Promise<string> => {
      const line: string[] = [];
      const id = await startIdle(n, ref);
      try {
        const rxr = link.rxBytes();
        const first = await timedExec(n, id, FIRST_READ);
        const rxRead = link.rxBytes() - rxr;
        const warm = await timedExec(n, id, FULL_READ.script);
        put(`${base} first-read`, `  ${base}: first full read`, 's', d, first, `after the task, in a new container: ${FIRST_READ} (gear: fetches every file not yet cached)`);
        put(`${base} first-read rx`, `  ${base}: full-read bytes received`, 'bytes', d, rxRead, 'bytes received during the first full read');
        put(`${base} warm-read`, `  ${base}: warm read, same ctr`, 's', d, warm, `then, same container: ${FULL_READ.script}`);
        line.push(`full read ${first.toFixed(2)} s, warm ${warm.toFixed(2)} s`);
      } finally {
        await n.docker(['rm', '-f', id]);
      }
      const id2 = await startIdle(n, ref);
      try {
        await timedExec(n, id2, FULL_READ.script);
        const again = await timedExec(n, id2, FULL_READ.script);
        put(`${base} pool-read`, `  ${base}: warm read, new ctr`, 's', d, again, `a new container (new overlay mount), second pass of: ${FULL_READ.script}`);
        line.push(`new ctr warm ${again.toFixed(2)} s`);
      } finally {
        await n.docker(['rm', '-f', id2]);
      }
      return line.join(', ');
    };

    for (const l of links) {
      await registry.start(l.oneWayDelayMs ?? 0);
      await link.shape(l.shape);
      log(`cold-deploy: link ${l.key}: ${await link.qdiscs()}${l.oneWayDelayMs ? `, +${l.oneWayDelayMs} ms each way (delay proxy)` : ''}`);
      const reps = l.slow ? slowReps() : cfg.coldReps;
      for (let rep = 0; rep < reps; rep++) {
        // Interleaved per image: every system deploys the image back to back, the order rotating per repetition.
        for (const img of images) {
          const line: string[] = [];
          for (const d of systemOrder(systems, rep)) {
            // A fresh node per image and system: nothing cached, neither layers nor Gear files.
            const n = await node(d);
            try {
              const base = `${l.key} ${img.key}`;
              try {
                line.push(await deploy(n, d, l, img, base, `cold ${base}`, img.key));
              } catch (e) {
                if (isGear(d) && !probed && cfg.cold === 'auto' && n.dockerd) {
                  report.note(
                    `cold-deploy skipped: the lazy path does not work end to end here (first Gear deploy of ${refs[img.key]![d]}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)})`,
                  );
                  report.extra['cold-deploy-failure'] = { error: String(e), logTail: n.dockerd.logTail(60) };
                  return;
                }
                // One deploy failing must not lose the others' samples: note it, fail the run at the end.
                failures.push(`${l.key} ${img.key} ${d}: ${e instanceof Error ? e.message.split('\n').slice(0, 3).join(' ') : String(e)}`);
                report.note(`cold-deploy ${l.key} ${img.key} on ${d} failed: ${failures.at(-1)}`);
                continue;
              }
              if (img.reads && l.readsToo && n.dockerd) line.push(await reads(n.dockerd, d, refs[img.key]![d], base));
              const next = img.nextVersion ? byKey.get(img.nextVersion) : undefined;
              if (next) {
                // The app's next version on the same node: gear's pool (stargz's cache) holds what v1 fetched.
                const b = `${l.key} ${next.key} after ${img.key}`;
                line.push(`then ${await deploy(n, d, l, next, b, b, `${next.key} after ${img.key}`)}`);
              }
              if (cfg.profile && n.ctrLogs) {
                mkdirSync(PROFILE_LOG_DIR, { recursive: true });
                for (const [what, file] of Object.entries(n.ctrLogs)) copyFileSync(file, join(PROFILE_LOG_DIR, `${l.key}-${img.key}-${d}-rep${rep + 1}.${what}.log`));
                log(`profile: snapshotter and containerd logs kept in ${PROFILE_LOG_DIR}`);
              }
              if (isGear(d) && n.dockerd) {
                const g = n.dockerd;
                gearStatuses.push({ link: l.key, rep, image: img.key, system: d, status: await gearStatus(g), ...(cfg.profile ? { requests: gearRequestProfile(g, 0) } : {}) });
                if (cfg.profile) {
                  log(`gear plugin requests of the ${img.key} node (ms):\n${formatProfile(gearRequestProfile(g, 0))}`);
                  // The daemon's debug log (every request and fetch, timestamped) outlives the node for a closer look.
                  const keep = join(PROFILE_LOG_DIR, `${l.key}-${img.key}-${d}-rep${rep + 1}.gear.log`);
                  mkdirSync(PROFILE_LOG_DIR, { recursive: true });
                  if (g.logs.gear) copyFileSync(g.logs.gear, keep);
                  log(`profile: gear daemon log kept at ${keep}`);
                }
              }
            } finally {
              await release(n);
            }
          }
          log(`cold-deploy ${l.key} rep ${rep + 1}/${reps} ${img.key}: ${line.join('; ')}`);
        }
      }
    }
    // The overlay2-vs-gear rows (issue 6 targets) as before; every system's samples in the side-by-side table.
    for (const v of series.values()) {
      report.add({ section: 'cold-deploy', name: v.name, unit: v.unit, higherIsBetter: v.higherIsBetter, samples: { overlay2: v.s.overlay2, gear: v.s[legacyGear] }, description: v.description });
    }
    const sideText = systemsTable(side, systems);
    report.tables.push({ title: `cold deploy, side by side (${systems.join(', ')})`, text: `${sideText}\n\n${storageText}` });
    (report.extra['cold-deploy'] as Record<string, unknown>).systemSamples = side.samples;

    // Summary rows: geometric means over the images (of each driver's medians), per link.
    type Driver = 'overlay2' | 'gear';
    const med = (key: string, d: Driver): number | undefined => {
      const xs = [...(series.get(key)?.s[d === 'gear' ? legacyGear : 'overlay2'] ?? [])].sort((a, b) => a - b);
      return xs.length ? (xs.length % 2 ? xs[(xs.length - 1) / 2]! : (xs[xs.length / 2 - 1]! + xs[xs.length / 2]!) / 2) : undefined;
    };
    const summaries: Record<string, unknown> = {};
    for (const l of links) {
      const got = images.filter((i) => med(`${l.key} ${i.key} deploy`, 'overlay2') && med(`${l.key} ${i.key} deploy`, 'gear'));
      if (got.length === 0) continue;
      const gm = (what: string, d: Driver) => geomean(got.map((i) => med(`${l.key} ${i.key} ${what}`, d)!));
      const target = l.key === TARGET_LINK && got.length >= 5;
      for (const [what, unit, t, label] of [
        ['deploy', 's', DEPLOY_TARGET, 'pull+run'],
        ['rx', 'bytes', BYTES_TARGET, 'bytes received'],
      ] as const) {
        const m = report.add({
          section: 'cold-deploy',
          name: `COLD ${l.key}: geomean ${label}, ${got.length} images`,
          unit,
          higherIsBetter: false,
          samples: { overlay2: [gm(what, 'overlay2')], gear: [gm(what, 'gear')] },
          ...(target ? { target: t } : {}),
          description: `geometric mean over ${got.map((i) => i.key).join(', ')} of each driver's median cold ${label}${target ? ` (issue 6 target: ${what === 'deploy' ? `>= ${t}x faster` : `<= ${100 / t}% of overlay2's bytes`})` : ''}`,
        });
        summaries[`${l.key} ${what}`] = { images: got.map((i) => i.key), overlay2: m.summary.overlay2.median, gear: m.summary.gear.median, ratio: m.ratio };
      }
      for (const img of got) {
        const next = img.nextVersion ? byKey.get(img.nextVersion) : undefined;
        if (!next) continue;
        const warm = med(`${l.key} ${next.key} after ${img.key} rx`, 'gear');
        const cold = med(`${l.key} ${next.key} rx`, 'overlay2');
        if (warm === undefined || cold === undefined) continue;
        report.add({
          section: 'cold-deploy',
          name: `WARM ${l.key}: ${next.key} on a node that ran ${img.key}, gear bytes vs cold overlay2`,
          unit: 'bytes',
          higherIsBetter: false,
          samples: { overlay2: [cold], gear: [warm] },
          ...(l.key === TARGET_LINK ? { target: WARM_BYTES_TARGET } : {}),
          description: `gear: bytes received deploying ${next.key} after ${img.key} on the same node (warm pool); overlay2: a cold deploy of ${next.key} (issue 6 target <= 5%). With its base layer cached, overlay2's own second deploy is in "${l.key} ${next.key} after ${img.key}"`,
        });
      }
    }
    const extra = report.extra['cold-deploy'] as Record<string, unknown>;
    extra.gearStatus = gearStatuses;
    extra.summaries = summaries;
    if (failures.length) throw new Error(`cold-deploy: ${failures.length} deploy(s) failed: ${failures.join('; ')}`);
  } finally {
    for (const n of [...nodes]) await n.stop();
    await registry.stop();
    await link.shape({}).catch(() => {});
    await link.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
