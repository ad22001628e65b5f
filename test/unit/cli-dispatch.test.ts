/**
 * The gear command loads only the module of the command it is given
 * (src/cli/gear.ts); help, --version and a mistyped command still see every
 * command. Runs the built CLI (dist/), as a user does.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const gear = path.resolve(import.meta.dirname, '../../dist/cli/gear.js');
const run = (...args: string[]) => spawnSync(process.execPath, [gear, ...args], { encoding: 'utf8', timeout: 30_000 });
const COMMANDS = ['daemon', 'cache', 'convert', 'analyze', 'copy', 'prefetch', 'snapshotter', 'stats'];

describe('gear command dispatch', () => {
  it('help with no command lists every command', () => {
    const r = run('--help');
    expect(r.status).toBe(0);
    for (const c of COMMANDS) expect(r.stdout).toMatch(new RegExp(`^  ${c}\\b`, 'm'));
  });

  it("a command's own help comes from its module alone", () => {
    for (const c of COMMANDS) {
      const r = run(c, '--help');
      expect(r.status, `${c}: ${r.stderr}`).toBe(0);
      expect(r.stdout).toContain(`Usage: gear ${c}`);
    }
  });

  it('a mistyped command is told the nearest name, with every command loaded', () => {
    const r = run('conver');
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("unknown command 'conver'");
    expect(r.stderr).toContain('convert');
  });

  it('a subcommand of a loaded command still works (cache status needs a root)', () => {
    const r = run('cache', 'status', '--help');
    expect(r.status).toBe(0);
    expect(r.stdout).toContain('Usage: gear cache status');
  });
});
