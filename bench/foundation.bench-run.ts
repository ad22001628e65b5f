/**
 * `make bench`: overlay2 vs Gear on the same images, in one run, interleaved.
 *
 *   lifecycle    create+start+wait+rm of busybox `true` (containers/s)      target >= 0.9x
 *   read         checksum / cat / stat of the minbase rootfs, warm cache    target >= 0.97x
 *   cold-deploy  pull + first task of Gear vs Docker vs eStargz images (busybox,
 *                minbase, python app v1/v2, perl app, nginx, and issue 11's tree
 *                walk, python3, numpy, bullseye app, redis, nodejs) through shaped links
 *                (registry in a network namespace, veth, tc tbf; a delay
 *                proxy for added RTT); geomean at 100 Mbit/s         target >= 6x, bytes <= 20%
 *                second app version on a warm gear node              bytes <= 5%
 *   reread       a file read again in the same container after its lazy fetch
 *                (lib/reread.ts: a big file, 2,048 small ones)  issue 15 >= 0.95x
 *   series       five versions of one app: registry storage after each version per
 *                system, warm v2 bytes (lib/series.ts)           issue 15 <= 50%, <= 2%
 *
 * At the end: issue 15's targets (lib/targets.ts) from the samples of the run,
 * PASS/FAIL or "not measured", printed and kept in the JSON (extra.targets), and
 * a PNG of the cold deploys per image and system next to the JSON (lib/plot.ts).
 *
 * Both dockerds (overlay2 and gear, test/helpers/dockerd.ts) run for the
 * whole run; repetitions alternate the drivers (A/B, B/A, …). The table is
 * printed at the end and the raw samples, summaries, commit and date go to
 * bench/results/<date>-<shortsha>.json.
 *
 * Adding a benchmark: write a section (ctx: SectionContext) that calls
 * ctx.report.add() per metric with both drivers' raw samples, and list it in
 * SECTIONS below.
 *
 * Environment: GEAR_BENCH_REPS (5), GEAR_BENCH_READ_REPS (9), GEAR_BENCH_CONTAINERS (20),
 * GEAR_BENCH_COLD (auto|on|off), GEAR_BENCH_COLD_REPS (2: unshaped, 100mbit),
 * GEAR_BENCH_COLD_SLOW_REPS (1: 20mbit, rtt20ms), GEAR_BENCH_COLD_LINKS,
 * GEAR_BENCH_COLD_IMAGES and GEAR_BENCH_COLD_SYSTEMS (comma lists, default all;
 * see lib/cold-deploy.ts and bench/README.md), GEAR_BENCH_RECORD_READ_AHEAD (0: the
 * read-ahead of the daemon that records gear-opt's prefetch list),
 * GEAR_BENCH_REREAD_SYSTEMS / _REPS / _BIG_MIB (lib/reread.ts), GEAR_BENCH_SERIES_SYSTEMS /
 * _VERSIONS (lib/series.ts),
 * GEAR_BENCH_SECTIONS (lifecycle,read,cold-deploy,reread,series), GEAR_BENCH_PROFILE=1 (gear
 * daemon at debug level; per plugin method latency of each section in extra;
 * the debug logging costs a little, so profile runs are not the reported ones).
 */
import { afterAll, it } from 'vitest';
import { gearDaemonAvailable, REPO_ROOT, startDockerd, type Dockerd } from '../test/helpers/dockerd.js';
import { configFromEnv, log, type SectionContext } from './lib/common.js';
import { coldDeploySection } from './lib/cold-deploy.js';
import { lifecycleSection } from './lib/lifecycle.js';
import { formatProfile, gearLogSize, gearRequestProfile } from './lib/profile.js';
import { readSection } from './lib/read.js';
import { rereadSection } from './lib/reread.js';
import { seriesSection } from './lib/series.js';
import { Report } from './lib/report.js';
import { writeDeployPlot } from './lib/plot.js';
import { issue15Targets, targetsTable } from './lib/targets.js';

const SECTIONS: Record<string, (ctx: SectionContext) => Promise<void>> = {
  lifecycle: lifecycleSection,
  read: readSection,
  'cold-deploy': coldDeploySection,
  reread: rereadSection,
  series: seriesSection,
};

const started: Dockerd[] = [];

afterAll(async () => {
  for (const d of started) await d.stop();
});

it('benchmark: overlay2 vs gear', async () => {
  const cfg = configFromEnv();
  if (!(await gearDaemonAvailable())) throw new Error('dist/cli/gear.js has no `gear daemon`: run make build');
  const report = new Report({ ...cfg });
  log(`config ${JSON.stringify(cfg)}`);
  const overlay2 = await startDockerd({ driver: 'overlay2' });
  started.push(overlay2);
  const gear = await startDockerd({ driver: 'gear', ...(cfg.profile ? { gearArgs: ['--log-level', 'debug'] } : {}) });
  started.push(gear);
  log(`dockerds up: overlay2 ${overlay2.dir}, gear ${gear.dir} (-s ${gear.storageDriver})`);
  const ctx: SectionContext = { cfg, report, pair: { overlay2, gear }, repoRoot: REPO_ROOT };
  let failure: unknown;
  for (const name of cfg.sections) {
    const section = SECTIONS[name];
    if (!section) throw new Error(`unknown section ${name} (have ${Object.keys(SECTIONS).join(', ')})`);
    log(`section ${name}`);
    const t0 = Date.now();
    const logMark = cfg.profile ? gearLogSize(gear) : 0;
    try {
      await section(ctx);
      if (cfg.profile) {
        const prof = gearRequestProfile(gear, logMark);
        report.extra[`${name}-gear-requests`] = prof;
        log(`gear plugin requests during ${name} (ms):\n${formatProfile(prof)}`);
      }
    } catch (e) {
      // Keep what the other sections measured; fail the run at the end.
      failure ??= e;
      report.note(`section ${name} failed: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
      process.stdout.write(`${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    }
    log(`section ${name} took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  }
  try {
    const st = await gear.docker(['info', '--format', '{{json .DriverStatus}}']);
    report.extra.gearDriverStatus = st.code === 0 ? JSON.parse(st.stdout) : st.stderr;
  } catch {
    /* informational */
  }
  // Issue 15's targets from this run's samples (PASS/FAIL, or "not measured"), kept in the JSON too.
  const targets = issue15Targets(report.extra);
  report.extra.targets = targets;
  const file = report.write(REPO_ROOT);
  let plot: string | undefined;
  try {
    const cold = report.extra['cold-deploy'] as { systemSamples?: Parameters<typeof writeDeployPlot>[1] } | undefined;
    plot = await writeDeployPlot(file, cold?.systemSamples, `make bench: cold deploy per image and system (${file.split('/').pop()!.replace(/\.json$/, '')})`);
  } catch (e) {
    report.note(`deploy plot not written: ${e instanceof Error ? e.message : String(e)}`);
  }
  process.stdout.write(`\n${report.table()}\n\n`);
  for (const t of report.tables) process.stdout.write(`${t.title}\n\n${t.text}\n\n`);
  for (const n of report.notes) process.stdout.write(`note: ${n}\n`);
  process.stdout.write(`issue 15 targets (this run)\n\n${targetsTable(targets)}\n\n`);
  process.stdout.write(`results: ${file}\n`);
  if (plot) process.stdout.write(`plot: ${plot}\n`);
  if (failure) throw failure;
});
