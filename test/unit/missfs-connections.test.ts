/**
 * The exit path's core (src/core/missfs/connections.ts): the process's live
 * miss filesystem sessions are known, and abortAllSessions() ends them all,
 * a reader thread blocked on /dev/fuse and a caller blocked on a request
 * included, so that the process can then exit. Real FUSE; needs root.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { silentLogger } from '../../src/core/log.js';
import { abortAllSessions, liveSessions, mountMissFs, type MissFsMount } from '../../src/core/missfs/index.js';
import { run, waitFor } from '../helpers/proc.js';

let dir: string | undefined;
const mounts: MissFsMount[] = [];

afterEach(async () => {
  for (const m of mounts.splice(0)) await m.unmount({ timeoutMs: 2_000 }).catch(() => undefined);
  if (dir) {
    for (const mp of [join(dir, 'a'), join(dir, 'b')]) await run('umount', ['-l', mp]);
    rmSync(dir, { recursive: true, force: true });
  }
  dir = undefined;
});

it('abortAllSessions ends every live session: blocked callers get ECONNABORTED, the readers exit, the registry empties', async () => {
  dir = mkdtempSync('/tmp/gear-conn-');
  // A provider that never answers: a LOOKUP of a digest blocks its caller until the connection goes.
  const provider = { lookup: () => new Promise<never>(() => undefined), open: () => new Promise<never>(() => undefined) };
  const before = liveSessions().length;
  for (const name of ['a', 'b']) mounts.push(await mountMissFs({ mountpoint: join(dir, name), provider, logger: silentLogger() }));
  expect(liveSessions().length).toBe(before + 2);
  expect(liveSessions().map((s) => s.mountpoint)).toEqual(expect.arrayContaining([join(dir, 'a'), join(dir, 'b')]));

  const hex = 'ab'.repeat(32);
  const child = spawn('cat', [join(dir, 'a', 'sha256', 'ab', hex)], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<number | null>((r) => child.on('close', r));
  const killer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  // Blocked: in flight on the session, not answered.
  expect(await waitFor(() => mounts[0]!.stats().inflight === 1, 5_000, 20)).toBe(true);

  expect(await abortAllSessions(silentLogger(), 3_000)).toBe(true);
  expect(liveSessions().length).toBe(before);
  await Promise.all(mounts.map((m) => m.closed));
  const code = await exited;
  clearTimeout(killer);
  expect(code).not.toBe(0);
  expect(stderr).toMatch(/Software caused connection abort/);
  // The mounts are dead, not hung: any access fails at once (the next daemon replaces them).
  for (const name of ['a', 'b']) expect(() => statSync(join(dir!, name, 'sha256'))).toThrow(/ENOTCONN/);
}, 60_000);

it('abortAllSessions with no session resolves at once', async () => {
  const before = liveSessions().length;
  expect(before).toBe(0);
  expect(await abortAllSessions(silentLogger(), 1_000)).toBe(true);
});
