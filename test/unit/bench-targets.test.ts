// make bench's issue 15 targets table and deploy plot (bench/lib/targets.ts, bench/lib/plot.ts):
// pure computations over a run's samples, checked here on made-up samples.
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { deploySvg, writeDeployPlot } from '../../bench/lib/plot.js';
import type { Samples } from '../../bench/lib/systems.js';
import { issue15Targets, targetsTable, type TargetRow } from '../../bench/lib/targets.js';

const row = (rows: TargetRow[], id: string): TargetRow => {
  const r = rows.find((x) => x.id === id);
  if (!r) throw new Error(`no row ${id}`);
  return r;
};

/** deploy/rx/requests/pull per system for one image on one link. */
function image(v: Record<string, { deploy: number; rx?: number; requests?: number; pull?: number }>): Samples[string][string] {
  const out: Record<string, Record<string, number[]>> = { deploy: {}, rx: {}, requests: {}, pull: {} };
  for (const [s, m] of Object.entries(v)) {
    out.deploy![s] = [m.deploy];
    if (m.rx !== undefined) out.rx![s] = [m.rx];
    if (m.requests !== undefined) out.requests![s] = [m.requests];
    if (m.pull !== undefined) out.pull![s] = [m.pull];
  }
  return out as Samples[string][string];
}

describe('issue 15 targets', () => {
  it('a run that measured nothing says "not measured" for every target, never PASS', () => {
    const rows = issue15Targets({});
    expect(rows.length).toBeGreaterThanOrEqual(15);
    expect(rows.every((r) => r.verdict === 'not measured')).toBe(true);
    expect(targetsTable(rows)).toContain('not measured');
  });

  it('per-image ratios: PASS only when every image meets the bound, the worst image named', () => {
    const samples: Samples = {
      '100mbit': {
        a: image({ overlay2: { deploy: 10 }, 'gear-opt': { deploy: 0.7, rx: 5, requests: 10, pull: 0.5 }, 'estargz-opt': { deploy: 1, rx: 6 }, gear: { deploy: 0.9, pull: 0.5 }, estargz: { deploy: 1 } }),
        b: image({ overlay2: { deploy: 20 }, 'gear-opt': { deploy: 1.8, rx: 7, requests: 60, pull: 0.6 }, 'estargz-opt': { deploy: 2, rx: 6 }, gear: { deploy: 1.5, pull: 0.5 }, estargz: { deploy: 2 } }),
      },
    };
    const rows = issue15Targets({ 'cold-deploy': { systemSamples: samples } });
    const opt = row(rows, 'deploy-opt');
    expect(opt.verdict).toBe('FAIL'); // b: 0.9x > 0.8x
    expect(opt.value).toContain('(b)');
    expect(opt.details).toEqual({ a: 0.7, b: 0.9 });
    expect(row(rows, 'deploy-lazy').verdict).toBe('PASS'); // 0.9x and 0.75x
    expect(row(rows, 'deploy-opt-ctr').verdict).toBe('not measured');
    // geomean of 10/0.7 and 20/1.8 = 12.6x
    expect(row(rows, 'geomean-gear-opt').verdict).toBe('PASS');
    expect(row(rows, 'bytes-opt').verdict).toBe('FAIL'); // b: 7 > 6
    const req = row(rows, 'requests');
    expect(req.verdict).toBe('FAIL');
    expect(req.value).toContain('60');
    expect(row(rows, 'pull-profile').verdict).toBe('FAIL'); // b: 0.6/0.5 = 1.2x
    expect(row(rows, 'rtt').verdict).toBe('not measured');
  });

  it('RTT compares rtt20ms with unshaped per image; a warm second version is not a cold start', () => {
    const samples: Samples = {
      unshaped: { a: image({ gear: { deploy: 1, requests: 20 } }), 'v2 after v1': image({ gear: { deploy: 0.2, requests: 80, rx: 1 } }) },
      rtt20ms: { a: image({ gear: { deploy: 1.2, requests: 20 } }) },
    };
    const rows = issue15Targets({ 'cold-deploy': { systemSamples: samples } });
    expect(row(rows, 'rtt').verdict).toBe('PASS');
    expect(row(rows, 'rtt').details).toEqual({ 'a gear': 1.2 });
    expect(row(rows, 'requests').verdict).toBe('PASS');
  });

  it('storage, series, conversion, warm v2 and re-read from their sections', () => {
    const st = (mb: number) => ({ bytes: mb * 1e6 });
    const rows = issue15Targets({
      'cold-deploy': { storage: { overlay2: st(100), gear: st(60) }, publish: { a: { gearConvertSeconds: 2, inputBytes: 300e6 }, b: { gearConvertSeconds: 10, inputBytes: 200e6 } } },
      series: {
        storage: { overlay2: [st(80), st(90), st(100), st(110), st(120)], gear: [st(80), st(82), st(84), st(86), st(59)] },
        warm: { gearV2Rx: 1e6, overlay2ColdV2Rx: 80e6 },
        convert: [{ version: 1, seconds: 1, inputBytes: 200e6 }],
      },
      reread: { ratios: { gear: { big: 1.0, small: 0.5 }, 'gear-nopt': { big: 0.1, small: 0.1 }, 'gear-pt': { big: 0.97, small: 0.96 } } },
    });
    expect(row(rows, 'storage').verdict).toBe('PASS');
    expect(row(rows, 'storage-series').verdict).toBe('PASS'); // 59 / 120
    const conv = row(rows, 'convert');
    expect(conv.verdict).toBe('FAIL'); // b: 20 MB/s
    expect(conv.value).toContain('20.0 MB/s (b)');
    expect(row(rows, 'warm-v2').verdict).toBe('PASS'); // 1.25%
    const rr = row(rows, 'reread');
    expect(rr.verdict).toBe('FAIL');
    expect(rr.value).toContain('gear small');
    expect(rr.details).not.toHaveProperty('gear-nopt small'); // a diagnostic system, not the target
    expect(rr.details).not.toHaveProperty('gear-pt small'); // its own row
    const pt = row(rows, 'reread-pt');
    expect(pt.verdict).toBe('PASS');
    expect(pt.details).toEqual({ 'gear-pt big': 0.97, 'gear-pt small': 0.96 });
  });

  it('a series of fewer than five versions is not measured', () => {
    const st = (mb: number) => ({ bytes: mb * 1e6 });
    const rows = issue15Targets({ series: { storage: { overlay2: [st(80), st(90)], gear: [st(10), st(10)] } } });
    expect(row(rows, 'storage-series').verdict).toBe('not measured');
  });
});

describe('deploy plot', () => {
  it('draws one chart per link with every image and system, and renders a PNG next to the JSON', async () => {
    const samples: Samples = {
      '100mbit': { minbase: image({ overlay2: { deploy: 8 }, gear: { deploy: 1 }, 'estargz-opt': { deploy: 0.6 } }) },
      rtt20ms: { minbase: image({ gear: { deploy: 1.3 } }) },
    };
    const svg = deploySvg(samples, 'test run')!;
    expect(svg).toContain('100mbit: median cold deploy');
    expect(svg).toContain('rtt20ms: median cold deploy');
    expect(svg).toContain('minbase overlay2: 8.00 s');
    expect(svg).toContain('estargz-opt');
    expect(deploySvg({}, 'x')).toBeUndefined();
    const dir = mkdtempSync(join(tmpdir(), 'bench-plot-'));
    try {
      const json = join(dir, '20261206-000000-abcdef0.json');
      writeFileSync(json, '{}');
      const png = await writeDeployPlot(json, samples, 'test run');
      expect(png).toBe(join(dir, '20261206-000000-abcdef0-deploy.png'));
      expect(readFileSync(png!).subarray(0, 8)).toEqual(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
