/**
 * Section "cold-deploy" (issue 6): deploy on an empty node, Docker images on
 * overlay2 vs Gear images on gear, through a link we shape ourselves.
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
 * - Drivers alternate (ABBA) per repetition and link. GEAR_BENCH_COLD_REPS
 *   (default 2) repetitions on unshaped and 100mbit, GEAR_BENCH_COLD_SLOW_REPS
 *   (default 1) on 20mbit and rtt20ms; GEAR_BENCH_COLD_LINKS and
 *   GEAR_BENCH_COLD_IMAGES (comma lists) select a subset; GEAR_BENCH_COLD_DRIVERS=gear
 *   deploys gear's side only (no ratios: for comparing two versions of gear).
 *
 * GEAR_BENCH_COLD=auto skips the section (with a note) when the lazy path
 * does not work end to end: the first Gear deploy fails or the daemon reports
 * 'Lazy Pull' off.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI, startDockerd, type Dockerd } from '../../test/helpers/dockerd.js';
import { runOk, stopChild } from '../../test/helpers/proc.js';
import { log, nowS, orderOf, type SectionContext } from './common.js';
import { BENCH_IMAGES, type BenchImage } from './images.js';
import { ShapedLink, type Shape } from './netns.js';
import { formatProfile, gearRequestProfile } from './profile.js';
import { READ_TASKS, timedExec, startIdle } from './read.js';
import type { Driver } from './report.js';

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

async function gearStatus(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  return Object.fromEntries(JSON.parse(r.stdout) as [string, string][]);
}

/** The registry inside the namespace, listening on addr:port. */
async function startNsRegistry(link: ShapedLink, dir: string, addr: string, port: number): Promise<ChildProcess> {
  mkdirSync(join(dir, 'data'), { recursive: true });
  const cfg = join(dir, 'config.yml');
  writeFileSync(
    cfg,
    [
      'version: 0.1',
      'log:',
      '  level: error',
      '  accesslog:',
      '    disabled: true',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${join(dir, 'data')}`,
      'http:',
      `  addr: ${addr}:${port}`,
      '',
    ].join('\n'),
  );
  // `ip netns exec` execs the registry: the child pid is the registry's.
  const child = spawn('ip', ['netns', 'exec', link.ns, '/usr/bin/docker-registry', 'serve', cfg], { stdio: 'ignore' });
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
class NsRegistry {
  private registry: ChildProcess | undefined;
  private proxy: ChildProcess | undefined;
  private delay = 0;
  constructor(
    private readonly link: ShapedLink,
    private readonly dir: string,
  ) {}

  get host(): string {
    return `${this.link.nsAddr}:${REGISTRY_PORT}`;
  }

  async start(oneWayDelayMs = 0): Promise<void> {
    if (this.registry && this.delay === oneWayDelayMs) return;
    await this.stop();
    this.delay = oneWayDelayMs;
    if (oneWayDelayMs === 0) {
      this.registry = await startNsRegistry(this.link, this.dir, this.link.nsAddr, REGISTRY_PORT);
      return;
    }
    this.registry = await startNsRegistry(this.link, this.dir, '127.0.0.1', REGISTRY_PORT + 1);
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

export async function coldDeploySection(ctx: SectionContext): Promise<void> {
  const { cfg, report, pair } = ctx;
  if (cfg.cold === 'off') {
    report.note('cold-deploy skipped (GEAR_BENCH_COLD=off)');
    return;
  }
  const wantLinks = listFromEnv('GEAR_BENCH_COLD_LINKS');
  const wantImages = listFromEnv('GEAR_BENCH_COLD_IMAGES');
  // GEAR_BENCH_COLD_DRIVERS=gear: gear's side only (no ratios), to compare changes to gear between runs.
  const wantDrivers = listFromEnv('GEAR_BENCH_COLD_DRIVERS');
  const links = LINKS.filter((l) => !wantLinks || wantLinks.includes(l.key));
  const images = BENCH_IMAGES.filter((i) => !wantImages || wantImages.includes(i.key));
  const byKey = new Map(images.map((i) => [i.key, i] as const));
  const work = mkdtempSync('/tmp/gear-bench-cold-');
  const link = new ShapedLink();
  const registry = new NsRegistry(link, join(work, 'registry'));
  const nodes: Dockerd[] = [];
  try {
    await link.create();
    await registry.start();
    const reg = registry.host;
    log(`cold-deploy: registry ${reg} in netns ${link.ns} (veth ${link.hostIf}/${link.nsIf}); images ${images.map((i) => i.key).join(', ')}`);

    // Publish every image both ways, unshaped.
    const refs: Record<string, Record<Driver, string>> = {};
    const publish: Record<string, unknown> = {};
    for (const img of images) {
      let t0 = nowS();
      await img.build(pair.overlay2);
      const buildS = nowS() - t0;
      const archive = join(work, `${img.key}.tar`);
      await pair.overlay2.dockerOk(['save', '-o', archive, img.tag], { timeoutMs: 600_000 });
      const docker = `${reg}/bench/${img.key}:docker`;
      const gear = `${reg}/bench/${img.key}:gear`;
      t0 = nowS();
      await runOk('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `docker-archive:${archive}`, `docker://${docker}`], { timeoutMs: 900_000 });
      const pushS = nowS() - t0;
      t0 = nowS();
      const conv = await runOk(
        process.execPath,
        [GEAR_CLI, 'convert', '--no-progress', '--json', '--concurrency', '16', '--insecure-registry', reg, `docker-archive:${archive}`, gear],
        { timeoutMs: 900_000 },
      );
      const convertS = nowS() - t0;
      let summary: unknown = conv.stdout.trim();
      try {
        summary = JSON.parse(conv.stdout);
      } catch {
        /* keep text */
      }
      let prefetch: unknown;
      let prefetchS = 0;
      if (prefetchOn()) {
        // What an image maintainer does once: run the task on a node whose pool is empty,
        // then publish the files it opened as the image's prefetch list (gear prefetch).
        t0 = nowS();
        const rec = await startDockerd({ driver: 'gear', dockerdArgs: ['--insecure-registry', reg], gearArgs: ['--insecure-registry', reg] });
        try {
          await rec.dockerOk(['pull', '-q', gear], { timeoutMs: 900_000 });
          await rec.dockerOk(['run', '--rm', '--network', 'none', gear, ...img.task], { timeoutMs: 900_000 });
          const r = await runOk(process.execPath, [GEAR_CLI, 'prefetch', '--json', '--insecure-registry', reg, '--from-pool', join(rec.gearRoot!, 'pool'), gear], { timeoutMs: 900_000 });
          prefetch = JSON.parse(r.stdout);
        } finally {
          await rec.stop();
        }
        prefetchS = nowS() - t0;
      }
      publish[img.key] = { docker, gear, buildSeconds: buildS, skopeoPushSeconds: pushS, gearConvertSeconds: convertS, convert: summary, ...(prefetch ? { prefetchSeconds: prefetchS, prefetch } : {}) };
      refs[img.key] = { overlay2: docker, gear };
      rmSync(archive, { force: true });
      const pf = prefetch as { prefetch: number; files: number } | undefined;
      log(
        `cold-deploy: published ${img.key}: build ${buildS.toFixed(0)} s, docker push ${pushS.toFixed(1)} s, gear convert ${convertS.toFixed(1)} s` +
          (pf ? `, recorded run + gear prefetch ${prefetchS.toFixed(1)} s (${pf.prefetch} of ${pf.files} files listed)` : ', no prefetch list'),
      );
    }
    report.extra['cold-deploy'] = { registry: reg, netns: link.ns, links, images: images.map(({ build: _b, ...i }) => i), publish, coldReps: cfg.coldReps, slowReps: slowReps(), prefetch: prefetchOn() };

    const node = async (d: Driver): Promise<Dockerd> => {
      const n = await startDockerd({
        driver: d,
        dockerdArgs: ['--insecure-registry', reg],
        ...(d === 'gear' ? { gearArgs: ['--insecure-registry', reg, ...(cfg.profile ? ['--log-level', 'debug'] : [])] } : {}),
      });
      nodes.push(n);
      return n;
    };
    const release = async (n: Dockerd) => {
      await n.stop();
      nodes.splice(nodes.indexOf(n), 1);
    };

    type Series = Record<Driver, number[]>;
    const series = new Map<string, { name: string; unit: string; higherIsBetter: boolean; s: Series; description: string }>();
    const put = (key: string, name: string, unit: string, d: Driver, v: number, description: string, higherIsBetter = false) => {
      if (!series.has(key)) series.set(key, { name, unit, higherIsBetter, s: { overlay2: [], gear: [] }, description });
      series.get(key)!.s[d].push(v);
    };
    const gearStatuses: unknown[] = [];
    const failures: string[] = [];
    let probed = false;

    /** docker pull + docker run of img on n; records the series under `base`. */
    const deploy = async (n: Dockerd, d: Driver, l: LinkSpec, img: BenchImage, base: string, what: string): Promise<string> => {
      const ref = refs[img.key]![d];
      const rx0 = link.rxBytes();
      const startWall = Date.now();
      const t0 = nowS();
      await n.dockerOk(['pull', '-q', ref], { timeoutMs: 900_000 });
      const t1 = nowS();
      await n.dockerOk(['run', '--rm', '--network', 'none', ref, ...img.task], { timeoutMs: 900_000 });
      const t2 = nowS();
      const rx = link.rxBytes() - rx0;
      if (d === 'gear' && !probed) {
        const st = await gearStatus(n);
        if (!/^on/.test(st['Lazy Pull'] ?? '')) throw new Error(`gear reports Lazy Pull '${st['Lazy Pull']}'`);
        probed = true;
      }
      if (cfg.profile) log(`profile: ${d} ${base}: pull ${new Date(startWall).toISOString()} → run ${new Date(startWall + (t1 - t0) * 1000).toISOString()} → done ${new Date(startWall + (t2 - t0) * 1000).toISOString()}`);
      put(`${base} deploy`, `${what}: pull+run`, 's', d, t2 - t0, `docker pull + docker run --rm ${img.task.join(' ')} over the ${l.key} link`);
      put(`${base} pull`, `  ${base}: pull`, 's', d, t1 - t0, 'docker pull alone');
      put(`${base} run`, `  ${base}: first run`, 's', d, t2 - t1, 'first docker run --rm of the task (gear: lazy fetches)');
      put(`${base} rx`, `  ${base}: bytes received`, 'bytes', d, rx, 'bytes the node received over the veth during pull+run (IP headers included)');
      return `${img.key} ${(t2 - t0).toFixed(2)} s ${(rx / 1e6).toFixed(1)} MB`;
    };

    /** First full read, then warm reads in the same and in a new container (minbase). */
    const reads = async (n: Dockerd, d: Driver, ref: string, base: string): Promise<string> => {
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
        for (const d of orderOf(rep).filter((x) => !wantDrivers?.length || wantDrivers.includes(x))) {
          const line: string[] = [];
          for (const img of images) {
            // A fresh node per image: nothing cached, neither layers nor Gear files.
            const n = await node(d);
            try {
              const base = `${l.key} ${img.key}`;
              try {
                line.push(await deploy(n, d, l, img, base, `cold ${base}`));
              } catch (e) {
                if (d === 'gear' && !probed && cfg.cold === 'auto') {
                  report.note(
                    `cold-deploy skipped: the lazy path does not work end to end here (first Gear deploy of ${refs[img.key]!.gear}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)})`,
                  );
                  report.extra['cold-deploy-failure'] = { error: String(e), logTail: n.logTail(60) };
                  return;
                }
                // One image failing must not lose the others' samples: note it, fail the run at the end.
                failures.push(`${l.key} ${img.key} ${d}: ${e instanceof Error ? e.message.split('\n').slice(0, 3).join(' ') : String(e)}`);
                report.note(`cold-deploy ${l.key} ${img.key} on ${d} failed: ${failures.at(-1)}`);
                continue;
              }
              if (img.reads && l.readsToo) line.push(await reads(n, d, refs[img.key]![d], base));
              const next = img.nextVersion ? byKey.get(img.nextVersion) : undefined;
              if (next) {
                // The app's next version on the same node: gear's pool holds what v1 fetched.
                line.push(`then ${await deploy(n, d, l, next, `${l.key} ${next.key} after ${img.key}`, `${l.key} ${next.key} after ${img.key}`)}`);
              }
              if (d === 'gear') {
                gearStatuses.push({ link: l.key, rep, image: img.key, status: await gearStatus(n), ...(cfg.profile ? { requests: gearRequestProfile(n, 0) } : {}) });
                if (cfg.profile) {
                  log(`gear plugin requests of the ${img.key} node (ms):\n${formatProfile(gearRequestProfile(n, 0))}`);
                  // The daemon's debug log (every request and fetch, timestamped) outlives the node for a closer look.
                  const keep = join(PROFILE_LOG_DIR, `${l.key}-${img.key}-rep${rep + 1}.gear.log`);
                  mkdirSync(PROFILE_LOG_DIR, { recursive: true });
                  if (n.logs.gear) copyFileSync(n.logs.gear, keep);
                  log(`profile: gear daemon log kept at ${keep}`);
                }
              }
            } finally {
              await release(n);
            }
          }
          log(`cold-deploy ${l.key} rep ${rep + 1}/${reps} ${d}: ${line.join('; ')}`);
        }
      }
    }
    for (const v of series.values()) {
      report.add({ section: 'cold-deploy', name: v.name, unit: v.unit, higherIsBetter: v.higherIsBetter, samples: v.s, description: v.description });
    }

    // Summary rows: geometric means over the images (of each driver's medians), per link.
    const med = (key: string, d: Driver): number | undefined => {
      const xs = [...(series.get(key)?.s[d] ?? [])].sort((a, b) => a - b);
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
