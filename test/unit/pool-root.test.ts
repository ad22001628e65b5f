/**
 * `gear cache status --root` pointed at the managed plugin's host
 * directories (docs/plugin.md: `<data-root>/plugins/<id>/propagated-mount`)
 * finds the pool in `propagated-mount/store`; a directory with no pool says
 * where the managed plugin keeps it instead of showing an empty pool.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openPool } from '../../src/core/pool/pool.js';

const gear = path.resolve(import.meta.dirname, '../../dist/cli/gear.js');
const ID = 'c0ffee'.padEnd(64, '0');
let dir: string;
let dataRoot: string;
let store: string;

const status = (root: string) => spawnSync(process.execPath, [gear, 'cache', 'status', '--root', root, '--json'], { encoding: 'utf8' });

beforeAll(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'gear-pool-root-'));
  dataRoot = path.join(dir, 'docker');
  store = path.join(dataRoot, 'plugins', ID, 'propagated-mount', 'store');
  mkdirSync(path.join(dataRoot, 'plugins', ID, 'rootfs'), { recursive: true });
  const pool = await openPool({ root: store, capBytes: '7MiB' });
  await pool.close();
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('gear cache status finds the managed plugin pool', () => {
  it.each([
    ['the propagated-mount directory (the documented host path)', () => path.join(dataRoot, 'plugins', ID, 'propagated-mount')],
    ['the plugin directory', () => path.join(dataRoot, 'plugins', ID)],
    ['the plugin rootfs', () => path.join(dataRoot, 'plugins', ID, 'rootfs')],
    ['<data-root>/plugins', () => path.join(dataRoot, 'plugins')],
    ['the docker data-root', () => dataRoot],
    ['the store itself', () => store],
  ])('from %s', (_what, root) => {
    const r = status(root());
    expect(r.status, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout) as { root: string; capBytes: number };
    expect(s.root).toBe(store);
    expect(s.capBytes).toBe(7 * 1024 * 1024);
  });

  it('a directory without a pool names where the managed plugin keeps it', () => {
    const empty = path.join(dir, 'empty');
    mkdirSync(empty);
    const r = status(empty);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/no Gear pool in .*empty/);
    expect(r.stderr).toMatch(/plugins\/<plugin id>\/propagated-mount\/store/);
  });

  it('prune and verify follow the same directories, and never open a new empty pool elsewhere', () => {
    const mount = path.join(dataRoot, 'plugins', ID, 'propagated-mount');
    const v = spawnSync(process.execPath, [gear, 'cache', 'verify', '--root', mount, '--json'], { encoding: 'utf8' });
    expect(v.status, v.stderr).toBe(0);
    expect(JSON.parse(v.stdout)).toMatchObject({ by: 'offline', bad: 0 });
    const p = spawnSync(process.execPath, [gear, 'cache', 'prune', '--root', mount, '--json'], { encoding: 'utf8' });
    expect(p.status, p.stderr).toBe(0);
    expect(existsSync(path.join(mount, 'pool'))).toBe(false);
  });
});
