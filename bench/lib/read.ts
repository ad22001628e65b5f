/**
 * Section "read": read-heavy tasks inside a running container of the
 * debootstrap minbase image (a plain, non-Gear image on both drivers), timed
 * inside the container (date +%s%N around the pipeline, so docker exec's own
 * cost is not counted). Page cache warm: every task runs once untimed first.
 */
import { MINBASE_TAG, importMinbase } from '../../test/helpers/images.js';
import type { Dockerd } from '../../test/helpers/dockerd.js';
import { log, nowS, orderOf, type SectionContext } from './common.js';
import type { Driver } from './report.js';

export interface ReadTask {
  key: string;
  name: string;
  /** Shell pipeline run under `sh -c` inside the container. */
  script: string;
  target?: number;
}

export const READ_TASKS: ReadTask[] = [
  {
    key: 'sha256-all',
    name: 'read: sha256 of every file',
    script: 'find / -xdev -type f -print0 | xargs -0 cat | sha256sum >/dev/null',
    target: 0.97,
  },
  {
    key: 'cat-all',
    name: 'read: cat every file >/dev/null',
    script: 'find / -xdev -type f -print0 | xargs -0 cat >/dev/null',
    target: 0.97,
  },
  {
    key: 'stat-walk',
    name: 'read: stat walk (find -printf)',
    script: "find / -xdev -printf '%s %m %u\\n' >/dev/null",
  },
];

/** Runs script inside container id, returns the seconds measured inside. */
export async function timedExec(d: Dockerd, id: string, script: string): Promise<number> {
  const wrapped = `t0=$(date +%s%N); ${script}; rc=$?; t1=$(date +%s%N); echo "$rc $((t1-t0))"`;
  const r = await d.dockerOk(['exec', id, 'sh', '-c', wrapped], { timeoutMs: 600_000 });
  const [rc, ns] = r.stdout.trim().split('\n').pop()!.split(' ').map(Number);
  if (rc !== 0 || !Number.isFinite(ns)) throw new Error(`timed exec failed: ${r.stdout} ${r.stderr}`);
  return ns! / 1e9;
}

/** Starts a long-running container of image; returns its id. */
export async function startIdle(d: Dockerd, image: string): Promise<string> {
  const r = await d.dockerOk(['run', '-d', '--network', 'none', image, 'sleep', 'infinity']);
  return r.stdout.trim();
}

export async function readSection(ctx: SectionContext, image = MINBASE_TAG): Promise<void> {
  const { cfg, report, pair } = ctx;
  const ids = {} as Record<Driver, string>;
  const importSeconds: Record<Driver, number> = { overlay2: NaN, gear: NaN };
  try {
    for (const d of ['overlay2', 'gear'] as Driver[]) {
      const inspect = await pair[d].docker(['image', 'inspect', '-f', '{{.Id}}', image]);
      if (inspect.code !== 0) {
        const t0 = nowS();
        await importMinbase(pair[d], image);
        importSeconds[d] = nowS() - t0;
        log(`read: imported ${image} into ${d} in ${importSeconds[d].toFixed(1)} s`);
      }
      ids[d] = await startIdle(pair[d], image);
    }
    // Size of what the tasks read, and a first untimed pass of every task (warm page cache).
    const sizes = await pair.overlay2.dockerOk(['exec', ids.overlay2, 'sh', '-c', "find / -xdev -type f -printf '%s\\n' | awk '{n++; b+=$1} END {print n, b}'"]);
    const [files, bytes] = sizes.stdout.trim().split(' ').map(Number);
    for (const d of ['overlay2', 'gear'] as Driver[]) for (const t of READ_TASKS) await timedExec(pair[d], ids[d], t.script);
    const samples: Record<string, Record<Driver, number[]>> = {};
    for (const t of READ_TASKS) samples[t.key] = { overlay2: [], gear: [] };
    for (let rep = 0; rep < cfg.readReps; rep++) {
      const line: string[] = [];
      for (const t of READ_TASKS) {
        for (const d of orderOf(rep)) samples[t.key]![d].push(await timedExec(pair[d], ids[d], t.script));
        line.push(`${t.key} o2 ${samples[t.key]!.overlay2.at(-1)!.toFixed(3)} s / gear ${samples[t.key]!.gear.at(-1)!.toFixed(3)} s`);
      }
      log(`read rep ${rep + 1}/${cfg.readReps}: ${line.join('; ')}`);
    }
    for (const t of READ_TASKS) {
      report.add({
        section: 'read',
        name: t.name,
        unit: 's',
        higherIsBetter: false,
        samples: samples[t.key]!,
        ...(t.target !== undefined ? { target: t.target } : {}),
        description: `seconds inside a running ${image} container (warm page cache) for: ${t.script}; ${files} files, ${bytes} bytes; ratio = throughput gear/overlay2`,
      });
    }
    report.extra.read = {
      image,
      files,
      bytes,
      importSeconds,
      throughputMBps: Object.fromEntries(
        READ_TASKS.filter((t) => t.key !== 'stat-walk').map((t) => [
          t.key,
          {
            overlay2: samples[t.key]!.overlay2.map((s) => Number((bytes! / s / 1e6).toFixed(1))),
            gear: samples[t.key]!.gear.map((s) => Number((bytes! / s / 1e6).toFixed(1))),
          },
        ]),
      ),
    };
  } finally {
    for (const d of ['overlay2', 'gear'] as Driver[]) if (ids[d]) await pair[d].docker(['rm', '-f', ids[d]]);
  }
}
