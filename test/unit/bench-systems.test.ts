/**
 * The pure logic of the cold-deploy comparison (bench/lib/systems.ts,
 * bench/lib/registry-storage.ts, issue 11): access-log counting, per-system
 * medians and geomeans, rotation of the system order, and the table's ratios.
 */
import { mkdtempSync, rmSync, appendFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { AccessLog } from '../../bench/lib/registry-storage.js';
import { SystemSamples, systemOrder, systemsTable, SYSTEMS } from '../../bench/lib/systems.js';

let dir = '';
afterEach(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = '';
});

describe('AccessLog', () => {
  it('counts the requests logged after a mark, with their response bytes', () => {
    dir = mkdtempSync(join(tmpdir(), 'bench-access-'));
    const f = join(dir, 'access.log');
    writeFileSync(f, '10.0.0.2 - - [06/Dec/2026:20:23:12 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "x"\n');
    const log = new AccessLog(f);
    const mark = log.mark();
    appendFileSync(
      f,
      [
        '10.0.0.2 - - [06/Dec/2026:20:23:12 +0000] "HEAD /v2/bench/a/manifests/esgz HTTP/1.1" 200 0 "" "containerd/1.6.20"',
        'time="2026-12-06T20:23:12Z" level=error msg="not an access log line"',
        '10.0.0.2 - - [06/Dec/2026:20:23:12 +0000] "GET /v2/bench/a/blobs/sha256:414c HTTP/1.1" 206 50000 "" "Go-http-client/1.1"',
        '10.0.0.2 - - [06/Dec/2026:20:23:12 +0000] "GET /v2/bench/a/blobs/sha256:414c HTTP/1.1" 206 200000 "" "Go-http-client/1.1"',
        '',
      ].join('\n'),
    );
    expect(log.since(mark)).toEqual({ requests: 3, bytes: 250_000, byMethod: { HEAD: 1, GET: 2 } });
    expect(log.since(log.mark()).requests).toBe(0);
  });

  it('reads nothing from a log that does not exist yet', () => {
    dir = mkdtempSync(join(tmpdir(), 'bench-access-'));
    const log = new AccessLog(join(dir, 'none.log'));
    expect(log.since(log.mark())).toEqual({ requests: 0, bytes: 0, byMethod: {} });
  });
});

describe('SystemSamples', () => {
  it('takes medians per system and geomeans over the images every system has', () => {
    const d = new SystemSamples();
    for (const v of [4, 2, 3]) d.add('100mbit', 'a', 'deploy', 'gear', v);
    d.add('100mbit', 'a', 'deploy', 'estargz', 1);
    d.add('100mbit', 'b', 'deploy', 'gear', 8);
    d.add('100mbit', 'b', 'deploy', 'estargz', 4);
    d.add('100mbit', 'c', 'deploy', 'gear', 100); // no estargz sample: left out of the geomean
    expect(d.median('100mbit', 'a', 'deploy', 'gear')).toBe(3);
    const g = d.geomeans('100mbit', 'deploy', ['gear', 'estargz']);
    expect(g.images).toEqual(['a', 'b']);
    expect(g.values.gear).toBeCloseTo(Math.sqrt(3 * 8), 9);
    expect(g.values.estargz).toBeCloseTo(2, 9);
    const table = systemsTable(d, ['gear', 'estargz']);
    // gear ÷ estargz of the geomeans: sqrt(24) / 2
    expect(table).toContain(`${(Math.sqrt(24) / 2).toFixed(2)}x`);
    expect(table).toMatch(/GEOMEAN deploy \(2 images\)/);
  });

  it('rotates the system order per repetition so that each system goes first in turn', () => {
    const firsts = SYSTEMS.map((_, rep) => systemOrder(SYSTEMS, rep)[0]);
    expect(new Set(firsts).size).toBe(SYSTEMS.length);
    expect([...systemOrder(SYSTEMS, 3)].sort()).toEqual([...SYSTEMS].sort());
  });
});
