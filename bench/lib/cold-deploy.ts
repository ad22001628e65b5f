/**
 * Section "cold-deploy" (issue 6): deploy on an empty node, Docker images on
 * overlay2 vs Gear images on gear, through a link we shape ourselves.
 *
 * - A registry (docker-registry 2.8) runs inside a network namespace created
 *   for the run, reachable over a veth pair; tc tbf on the veth ends gives the
 *   link profiles: 'unshaped' (veth at full speed, the loopback-like case) and
 *   '100mbit' (100 Mbit/s down, 20 Mbit/s up, burst 256kb, latency 50ms).
 * - Images: busybox and the debootstrap minbase, pushed as Docker images
 *   (skopeo, gzip layers) and converted to Gear images (gear convert, default
 *   storage) into the same registry.
 * - One sample: a fresh dockerd (and for gear a fresh gear daemon with an empty
 *   pool), `docker pull` + `docker run --rm` of the image's task; seconds, and
 *   bytes received over the veth (IP headers included). For minbase also the
 *   first full read of every file (8 parallel readers; gear: fetches what the
 *   task did not), then warm full reads in the same and in a new container
 *   (shaped link only).
 * - Drivers alternate (ABBA) per repetition and link.
 *
 * GEAR_BENCH_COLD=auto skips the section (with a note) when the lazy path
 * does not work end to end: the first Gear deploy fails or the daemon reports
 * 'Lazy Pull' off.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GEAR_CLI, startDockerd, type Dockerd } from '../../test/helpers/dockerd.js';
import { BUSYBOX_TAG, MINBASE_TAG, importBusybox, importMinbase } from '../../test/helpers/images.js';
import { runOk, stopChild } from '../../test/helpers/proc.js';
import { log, nowS, orderOf, type SectionContext } from './common.js';
import { ShapedLink, type Shape } from './netns.js';
import { formatProfile, gearRequestProfile } from './profile.js';
import { READ_TASKS, timedExec, startIdle } from './read.js';
import type { Driver } from './report.js';

interface ColdImage {
  key: string;
  source: string;
  /** The task that marks the container ready. */
  task: string[];
  /** Full-read / warm-read measurements after the task. */
  reads: boolean;
}

const IMAGES: ColdImage[] = [
  { key: 'busybox', source: BUSYBOX_TAG, task: ['true'], reads: false },
  { key: 'minbase', source: MINBASE_TAG, task: ['bash', '-c', 'dpkg -l >/dev/null && echo ready'], reads: true },
];

// The full reads after a deploy are bound by per-file fetch latency, not by the
// link (measured the same on both), so they run on the shaped link only.
const LINKS: { key: string; shape: Shape; readsToo: boolean }[] = [
  { key: 'unshaped', shape: {}, readsToo: false },
  { key: '100mbit', shape: { down: '100mbit', up: '20mbit' }, readsToo: true },
];

const FULL_READ = READ_TASKS.find((t) => t.key === 'sha256-all')!;
const FIRST_READ = 'find / -xdev -type f -print0 | xargs -0 -P8 -n64 cat >/dev/null';

async function gearStatus(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  return Object.fromEntries(JSON.parse(r.stdout) as [string, string][]);
}

async function startNsRegistry(link: ShapedLink, dir: string): Promise<{ child: ChildProcess; host: string }> {
  const port = 5000;
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
      `  addr: ${link.nsAddr}:${port}`,
      '',
    ].join('\n'),
  );
  // `ip netns exec` execs the registry: the child pid is the registry's.
  const child = spawn('ip', ['netns', 'exec', link.ns, '/usr/bin/docker-registry', 'serve', cfg], { stdio: 'ignore' });
  child.on('error', () => {});
  const host = `${link.nsAddr}:${port}`;
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) break;
    try {
      const r = await fetch(`http://${host}/v2/`, { signal: AbortSignal.timeout(1000) });
      await r.arrayBuffer();
      if (r.status === 200) return { child, host };
    } catch {
      /* not up yet */
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  await stopChild(child, 5000);
  throw new Error(`registry in ${link.ns} did not start on ${host}`);
}

export async function coldDeploySection(ctx: SectionContext): Promise<void> {
  const { cfg, report, pair } = ctx;
  if (cfg.cold === 'off') {
    report.note('cold-deploy skipped (GEAR_BENCH_COLD=off)');
    return;
  }
  const work = mkdtempSync('/tmp/gear-bench-cold-');
  const link = new ShapedLink();
  let registry: { child: ChildProcess; host: string } | undefined;
  const nodes: Dockerd[] = [];
  try {
    await link.create();
    registry = await startNsRegistry(link, join(work, 'registry'));
    const reg = registry.host;
    log(`cold-deploy: registry ${reg} in netns ${link.ns} (veth ${link.hostIf}/${link.nsIf})`);

    // Publish every image both ways, unshaped.
    const refs: Record<string, Record<Driver, string>> = {};
    const publish: Record<string, unknown> = {};
    for (const img of IMAGES) {
      const inspect = await pair.overlay2.docker(['image', 'inspect', '-f', '{{.Id}}', img.source]);
      if (inspect.code !== 0) img.key === 'busybox' ? await importBusybox(pair.overlay2) : await importMinbase(pair.overlay2);
      const archive = join(work, `${img.key}.tar`);
      await pair.overlay2.dockerOk(['save', '-o', archive, img.source], { timeoutMs: 600_000 });
      const docker = `${reg}/bench/${img.key}:docker`;
      const gear = `${reg}/bench/${img.key}:gear`;
      let t0 = nowS();
      await runOk('skopeo', ['copy', '--quiet', '--dest-tls-verify=false', `docker-archive:${archive}`, `docker://${docker}`], { timeoutMs: 900_000 });
      const pushS = nowS() - t0;
      t0 = nowS();
      const conv = await runOk(
        process.execPath,
        [GEAR_CLI, 'convert', '--no-progress', '--json', '--insecure-registry', reg, `docker-archive:${archive}`, gear],
        { timeoutMs: 900_000 },
      );
      const convertS = nowS() - t0;
      let summary: unknown = conv.stdout.trim();
      try {
        summary = JSON.parse(conv.stdout);
      } catch {
        /* keep text */
      }
      publish[img.key] = { docker, gear, skopeoPushSeconds: pushS, gearConvertSeconds: convertS, convert: summary };
      refs[img.key] = { overlay2: docker, gear };
      rmSync(archive, { force: true });
      log(`cold-deploy: published ${img.key}: docker push ${pushS.toFixed(1)} s, gear convert ${convertS.toFixed(1)} s`);
    }
    report.extra['cold-deploy'] = { registry: reg, netns: link.ns, links: LINKS, images: IMAGES, publish };

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
    let probed = false;

    for (const l of LINKS) {
      await link.shape(l.shape);
      log(`cold-deploy: link ${l.key}: ${await link.qdiscs()}`);
      for (let rep = 0; rep < cfg.coldReps; rep++) {
        for (const d of orderOf(rep)) {
          const n = await node(d);
          try {
            const line: string[] = [];
            for (const img of IMAGES) {
              const ref = refs[img.key]![d];
              const rx0 = link.rxBytes();
              const t0 = nowS();
              try {
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
                const base = `${l.key} ${img.key}`;
                put(`${base} deploy`, `cold ${base}: pull+run`, 's', d, t2 - t0, `fresh node, docker pull + docker run --rm ${img.task.join(' ')} over the ${l.key} link`);
                put(`${base} pull`, `  ${base}: pull`, 's', d, t1 - t0, 'docker pull alone');
                put(`${base} run`, `  ${base}: first run`, 's', d, t2 - t1, 'first docker run --rm of the task (gear: lazy fetches)');
                put(`${base} rx`, `  ${base}: bytes received`, 'bytes', d, rx, 'bytes the node received over the veth during pull+run (IP headers included)');
                line.push(`${img.key} ${(t2 - t0).toFixed(2)} s ${(rx / 1e6).toFixed(1)} MB`);
                if (img.reads && l.readsToo) {
                  // 1. first full read, 8 parallel readers (gear: fetches every file the task did not);
                  // 2. the sequential checksum of every file again in the same container (page cache warm);
                  // 3. the same in a new container (gear: a new overlay mount, files found in the pool).
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
                }
              } catch (e) {
                if (d === 'gear' && !probed && cfg.cold === 'auto') {
                  report.note(
                    `cold-deploy skipped: the lazy path does not work end to end here (first Gear deploy of ${ref}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)})`,
                  );
                  report.extra['cold-deploy-failure'] = { error: String(e), logTail: n.logTail(60) };
                  return;
                }
                throw e;
              }
            }
            if (d === 'gear') {
              gearStatuses.push({ link: l.key, rep, status: await gearStatus(n), ...(cfg.profile ? { requests: gearRequestProfile(n, 0) } : {}) });
              if (cfg.profile) log(`gear plugin requests of this node (ms):\n${formatProfile(gearRequestProfile(n, 0))}`);
            }
            log(`cold-deploy ${l.key} rep ${rep + 1}/${cfg.coldReps} ${d}: ${line.join('; ')}`);
          } finally {
            await release(n);
          }
        }
      }
    }
    for (const v of series.values()) {
      report.add({ section: 'cold-deploy', name: v.name, unit: v.unit, higherIsBetter: v.higherIsBetter, samples: v.s, description: v.description });
    }
    (report.extra['cold-deploy'] as Record<string, unknown>).gearStatus = gearStatuses;
  } finally {
    for (const n of [...nodes]) await n.stop();
    if (registry) await stopChild(registry.child, 10_000);
    await link.shape({}).catch(() => {});
    await link.destroy();
    rmSync(work, { recursive: true, force: true });
  }
}
