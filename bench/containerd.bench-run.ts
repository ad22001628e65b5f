/**
 * Cold deploy of the same Gear image through containerd and through dockerd:
 *
 *   containerd 1.6 + `gear snapshotter`:  ctr image pull --snapshotter gear, then ctr run --rm TASK
 *   dockerd 20.10 + `gear daemon`:        docker pull, then docker run --rm TASK
 *
 * Each repetition starts both stacks from nothing (fresh roots, empty Gear
 * file cache) and alternates which goes first. The registry is a local one on
 * loopback (no link shaping: bench/lib/cold-deploy.ts does that for dockerd),
 * so this compares the two frontends' overheads on the same lazy core, not
 * network cost. Informational: no target.
 *
 *   image   the debootstrap minbase (bookworm) converted with `gear convert`
 *   task    bash -c 'dpkg -l >/dev/null && echo ready'   (as cold-deploy.ts)
 *   bytes   Gear file cache size after the task = what was fetched lazily
 *
 * Run (not part of make test or make bench):
 *   make build && npx vitest run -c bench/vitest.config.ts bench/containerd.bench-run.ts
 * Environment: GEAR_BENCH_COLD_REPS (3).
 */
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, it } from 'vitest';
import { cacheStatus } from '../src/cli/cache.js';
import { startGearContainerd, type GearContainerd } from '../test/helpers/containerd.js';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../test/helpers/dockerd.js';
import { ensureMinbaseTar } from '../test/helpers/images.js';
import { writeDockerArchive } from '../test/helpers/oci-images.js';
import { runOk } from '../test/helpers/proc.js';
import { startRegistry, type TestRegistry } from '../test/helpers/registry.js';
import { configFromEnv, log, nowS } from './lib/common.js';
import { median } from './lib/stats.js';

const TASK = ['bash', '-c', 'dpkg -l >/dev/null && echo ready'];

type Stack = 'containerd' | 'dockerd';
interface Sample {
  pull: number;
  run: number;
  bytes: number;
}

let reg: TestRegistry | undefined;
let work = '';
let live: { stop(): Promise<void> } | undefined;

afterAll(async () => {
  await live?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

async function viaContainerd(ref: string): Promise<Sample> {
  const c: GearContainerd = await startGearContainerd({ gearLogLevel: 'info', tasks: ['cold'] });
  live = c;
  try {
    const t0 = nowS();
    await c.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', ref], 600_000);
    const t1 = nowS();
    const out = await c.ctrOk(['run', '--snapshotter', 'gear', '--rm', ref, 'cold', ...TASK], 600_000);
    const t2 = nowS();
    if (out.trim() !== 'ready') throw new Error(`containerd task printed ${JSON.stringify(out)}`);
    return { pull: t1 - t0, run: t2 - t1, bytes: (await cacheStatus(c.gearRoot)).bytes };
  } finally {
    await c.stop();
    live = undefined;
  }
}

async function viaDockerd(ref: string): Promise<Sample> {
  const d: Dockerd = await startDockerd({ driver: 'gear' });
  live = d;
  try {
    const t0 = nowS();
    await d.dockerOk(['pull', '-q', ref], { timeoutMs: 600_000 });
    const t1 = nowS();
    const out = (await d.dockerOk(['run', '--rm', ref, ...TASK], { timeoutMs: 600_000 })).stdout;
    const t2 = nowS();
    if (out.trim() !== 'ready') throw new Error(`dockerd task printed ${JSON.stringify(out)}`);
    return { pull: t1 - t0, run: t2 - t1, bytes: (await cacheStatus(d.gearRoot!)).bytes };
  } finally {
    await d.stop();
    live = undefined;
  }
}

it('benchmark: cold deploy of a Gear image, containerd vs dockerd', async () => {
  if (!(await gearDaemonAvailable())) throw new Error('dist/cli/gear.js has no `gear daemon`: run make build');
  const reps = configFromEnv().coldReps;
  work = mkdtempSync('/tmp/gear-bench-ctrd-');
  reg = await startRegistry();
  const archive = join(work, 'minbase.tar');
  await writeDockerArchive(archive, [readFileSync(await ensureMinbaseTar(log))], 'bench/minbase:latest');
  const ref = `${reg.host}/bench/minbase:gear`;
  const t = nowS();
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--no-progress', `docker-archive:${archive}`, ref], { timeoutMs: 1_800_000 });
  log(`converted minbase to ${ref} in ${(nowS() - t).toFixed(1)} s`);
  rmSync(archive, { force: true });

  const samples: Record<Stack, Sample[]> = { containerd: [], dockerd: [] };
  for (let i = 0; i < reps; i++) {
    const order: Stack[] = i % 2 === 0 ? ['containerd', 'dockerd'] : ['dockerd', 'containerd'];
    for (const stack of order) {
      const s = stack === 'containerd' ? await viaContainerd(ref) : await viaDockerd(ref);
      samples[stack].push(s);
      log(`rep ${i + 1}/${reps} ${stack}: pull ${s.pull.toFixed(2)} s, first task ${s.run.toFixed(2)} s, fetched ${(s.bytes / 1e6).toFixed(1)} MB`);
    }
  }
  const row = (stack: Stack) => {
    const xs = samples[stack];
    const m = (f: (s: Sample) => number) => median(xs.map(f));
    return `${stack.padEnd(11)} pull ${m((s) => s.pull).toFixed(2)} s   first task ${m((s) => s.run).toFixed(2)} s   total ${m((s) => s.pull + s.run).toFixed(2)} s   fetched ${(m((s) => s.bytes) / 1e6).toFixed(1)} MB`;
  };
  log(`cold deploy of minbase (Gear), medians of ${reps}, loopback registry:\n  ${row('containerd')}\n  ${row('dockerd')}`);
});
