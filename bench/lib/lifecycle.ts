/**
 * Section "lifecycle": create + start + wait + rm of a busybox container
 * running `true`, N in a row per repetition, through the Engine API. One
 * sample = containers/second of one repetition. The per-phase times are kept
 * (extra.lifecycle) to show where a difference comes from.
 */
import { BUSYBOX_TAG, importBusybox } from '../../test/helpers/images.js';
import { Engine } from './engine.js';
import { log, nowS, orderOf, type SectionContext } from './common.js';
import type { Driver } from './report.js';

type Phase = 'create' | 'start' | 'wait' | 'rm';
const PHASES: Phase[] = ['create', 'start', 'wait', 'rm'];

export async function lifecycleSection(ctx: SectionContext): Promise<void> {
  const { cfg, report, pair } = ctx;
  const engines: Record<Driver, Engine> = { overlay2: new Engine(pair.overlay2.sock), gear: new Engine(pair.gear.sock) };
  try {
    for (const d of ['overlay2', 'gear'] as Driver[]) {
      const inspect = await pair[d].docker(['image', 'inspect', '-f', '{{.Id}}', BUSYBOX_TAG]);
      if (inspect.code !== 0) await importBusybox(pair[d]);
    }
    const one = async (e: Engine, phases: Record<Phase, number[]>): Promise<void> => {
      const t0 = nowS();
      const id = await e.create(BUSYBOX_TAG, ['true']);
      const t1 = nowS();
      await e.start(id);
      const t2 = nowS();
      const code = await e.wait(id);
      const t3 = nowS();
      await e.remove(id);
      const t4 = nowS();
      if (code !== 0) throw new Error(`container exited with ${code}`);
      phases.create.push(t1 - t0);
      phases.start.push(t2 - t1);
      phases.wait.push(t3 - t2);
      phases.rm.push(t4 - t3);
    };
    // Warm-up (untimed): first container of a dockerd pays one-off costs.
    for (const d of ['overlay2', 'gear'] as Driver[]) {
      const scratch = { create: [], start: [], wait: [], rm: [] } as Record<Phase, number[]>;
      for (let i = 0; i < 3; i++) await one(engines[d], scratch);
    }
    const rates: Record<Driver, number[]> = { overlay2: [], gear: [] };
    const phaseMs: Record<Driver, Record<Phase, number[]>> = {
      overlay2: { create: [], start: [], wait: [], rm: [] },
      gear: { create: [], start: [], wait: [], rm: [] },
    };
    for (let rep = 0; rep < cfg.reps; rep++) {
      const line: string[] = [];
      for (const d of orderOf(rep)) {
        const phases = { create: [], start: [], wait: [], rm: [] } as Record<Phase, number[]>;
        const t0 = nowS();
        for (let i = 0; i < cfg.containers; i++) await one(engines[d], phases);
        const rate = cfg.containers / (nowS() - t0);
        rates[d].push(rate);
        // Per repetition: median ms of each phase.
        for (const p of PHASES) {
          const s = [...phases[p]].sort((a, b) => a - b);
          phaseMs[d][p].push(Number((s[Math.floor(s.length / 2)]! * 1000).toFixed(2)));
        }
        line.push(`${d} ${rate.toFixed(2)}/s`);
      }
      log(`lifecycle rep ${rep + 1}/${cfg.reps}: ${line.join(', ')}`);
    }
    report.add({
      section: 'lifecycle',
      name: `lifecycle: busybox true x${cfg.containers}`,
      unit: 'ctr/s',
      higherIsBetter: true,
      samples: rates,
      target: 0.9,
      description: `containers/second over ${cfg.containers} sequential create+start+wait+rm (Engine API v1.41, NetworkMode none) of ${BUSYBOX_TAG} running true; one sample per repetition`,
    });
    for (const p of PHASES) {
      report.add({
        section: 'lifecycle',
        name: `  phase ${p} (median per rep)`,
        unit: 'ms',
        higherIsBetter: false,
        samples: { overlay2: phaseMs.overlay2[p], gear: phaseMs.gear[p] },
        description: `median duration of the ${p} API call within one repetition`,
      });
    }
  } finally {
    engines.overlay2.close();
    engines.gear.close();
  }
}
