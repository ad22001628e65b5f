/**
 * Restart time of `gear daemon` (issue: `docker exec` fails while the daemon
 * is down): a store of 50 layers (40 ordinary in chains of 4, 10 Gear index
 * layers in image form, 5 container layers mounted over index layers), the
 * daemon killed with SIGKILL, then started again on the same root. Prints,
 * per run, the ms from spawn until the socket accepts, Plugin.Activate
 * answers, GetMetadata of a mounted layer answers, and Status answers.
 *
 *   npx vitest run --config bench/vitest.config.ts bench/restart.bench-run.ts
 *
 * GEAR_BENCH_BEFORE_CLI=/path/to/other/dist/cli/gear.js alternates each run
 * between that build and this one (same store, same machine load).
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { request } from 'node:http';
import { afterAll, beforeAll, it } from 'vitest';
import { indexLayerTar, pushFiles } from '../test/helpers/gear-index.js';
import { startGearService, socketAnswers, type GearService } from '../test/helpers/gear-service.js';
import { layerTar } from '../test/helpers/oci-images.js';
import { spawnLogged } from '../test/helpers/proc.js';
import { startRegistry, type TestRegistry } from '../test/helpers/registry.js';
import { GEAR_CLI } from '../test/helpers/dockerd.js';

let reg: TestRegistry | undefined;
let g: GearService | undefined;

beforeAll(async () => {
  reg = await startRegistry();
}, 60_000);
afterAll(async () => {
  await g?.dispose();
  await reg?.stop();
}, 60_000);

function post(socketPath: string, path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ socketPath, path, method: 'POST', timeout: 30_000 }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve(res.statusCode === 200 && !body.includes('"Err":"')));
    });
    req.on('error', () => resolve(false));
    req.on('timeout', () => req.destroy());
    req.end(path.includes('GetMetadata') ? '{"ID":"rw0"}' : 'null');
  });
}

async function until(check: () => Promise<boolean>, t0: number): Promise<number> {
  for (let i = 0; i < 6000; i++) {
    if (await check()) return Date.now() - t0;
    await new Promise((r) => setTimeout(r, 5));
  }
  return NaN;
}

it('restart time on a 50-layer store', async () => {
  g = await startGearService({ kind: 'daemon' });
  const files: Record<string, Buffer> = {};
  for (let i = 0; i < 40; i++) files[`data/f${i}`] = randomBytes(2_000 + i * 100);
  await pushFiles(reg!.host, 'gear-bench/restart', files);
  for (let c = 0; c < 10; c++) {
    let parent = '';
    for (let k = 0; k < 4; k++) {
      const id = `l${c}-${k}`;
      await g.call('Create', { ID: id, Parent: parent });
      const entries = Array.from({ length: 50 }, (_, j) => ({ path: `d${k}/f${j}`, content: randomBytes(500) }));
      await g.applyDiff(id, parent, await layerTar([{ path: `d${k}`, type: 'dir' }, ...entries]));
      parent = id;
    }
    const part = Object.fromEntries(Object.entries(files).slice(c * 4, c * 4 + 4));
    await g.call('Create', { ID: `idx${c}`, Parent: '' });
    await g.applyDiff(`idx${c}`, '', await indexLayerTar(reg!.host, 'gear-bench/restart', part));
    if (c < 5) {
      await g.call('CreateReadWrite', { ID: `rw${c}`, Parent: `idx${c}` });
      await g.call('Get', { ID: `rw${c}` });
    }
  }
  const rows: string[] = [];
  const before = process.env.GEAR_BENCH_BEFORE_CLI;
  const clis = before ? [before, GEAR_CLI] : [GEAR_CLI];
  for (let run = 0; run < 5 * clis.length; run++) {
    await g.kill9();
    const cli = clis[run % clis.length]!;
    const t0 = Date.now();
    const c = spawnLogged(process.execPath, [cli, 'daemon', '--socket', g.socket, '--root', g.root], g.log);
    const accept = await until(() => socketAnswers(g!.socket, 200), t0);
    const activate = await until(() => post(g!.socket, '/Plugin.Activate'), t0);
    const meta = await until(() => post(g!.socket, '/GraphDriver.GetMetadata'), t0);
    const status = await until(() => post(g!.socket, '/GraphDriver.Status'), t0);
    rows.push(`run ${run} ${cli === GEAR_CLI ? 'this build' : 'before'}: accept ${accept} ms, Activate ${activate} ms, GetMetadata ${meta} ms, Status ${status} ms`);
    // Where the time goes after the spawn: the daemon's own log lines of this start (ms from the spawn).
    const lines = readFileSync(g.log, 'utf8').trim().split('\n');
    const phases: string[] = [];
    for (const l of lines.slice(lines.findLastIndex((x) => x.includes('"msg":"listening"')))) {
      try {
        const j = JSON.parse(l) as { time: string; msg: string };
        phases.push(`${new Date(j.time).getTime() - t0} ${j.msg.slice(0, 60)}`);
      } catch {
        /* not a log line */
      }
    }
    rows.push('  ' + phases.join(' | '));
    c.kill('SIGKILL');
    await new Promise((r) => c.once('exit', r));
  }
  await g.start();
  process.stdout.write(rows.join('\n') + '\n');
}, 600_000);
