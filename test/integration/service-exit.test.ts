/**
 * A gear service must END when it must end (issue item 3): after a fatal
 * error, after SIGTERM/SIGINT, and after an orderly shutdown that hangs.
 * Before, a thread blocked in read(2) on /dev/fuse kept the process alive
 * after it logged "exiting": it held the socket and the miss filesystem,
 * answered nothing, no supervisor restarted it, and container reads hung.
 *
 * Real parts: `gear daemon` / `gear snapshotter` from dist/, a real registry
 * behind a fault proxy (to hold a lazy fetch in flight), real FUSE. The fatal
 * error is injected through the test-only GEAR_TEST_FAULTS (src/cli/test-faults.ts).
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { gearDaemonAvailable } from '../helpers/dockerd.js';
import { blobPath, indexLayerTar, pushFiles, sha256hex } from '../helpers/gear-index.js';
import { missMount, startGearService, type GearService } from '../helpers/gear-service.js';
import { waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const REPO = 'gear-test/exit';
const files: Record<string, Buffer> = { 'data/a': randomBytes(300_000), 'data/b': randomBytes(50_000) };

let available = false;
let reg: TestRegistry | undefined;
let proxy: FaultProxy | undefined;
let stall = false;
let tar: Buffer;
const services: GearService[] = [];

beforeAll(async () => {
  available = await gearDaemonAvailable();
  if (!available) return;
  reg = await startRegistry();
  proxy = await startFaultProxy(reg.url, (req) => (stall && req.url?.includes('/blobs/sha256:') ? { kind: 'hang' } : undefined));
  await pushFiles(reg.host, REPO, files);
  tar = await indexLayerTar(proxy.host, REPO, files);
}, 60_000);

afterEach(async () => {
  stall = false;
  for (const s of services.splice(0)) await s.dispose();
});

afterAll(async () => {
  await proxy?.stop();
  await reg?.stop();
});

/** A reader in a child process (a syscall blocked on FUSE must not block the test's threads). */
function reader(file: string): { done: Promise<{ code: number | null; stderr: string }> } {
  const child = spawn('cat', [file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  return {
    done: new Promise((resolve) =>
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ code, stderr });
      }),
    ),
  };
}

/** A daemon with an index layer applied, and a reader blocked on a lazy fetch of data/a that the proxy holds. */
async function daemonWithBlockedReader(env: NodeJS.ProcessEnv) {
  const g = await startGearService({ kind: 'daemon', env, args: ['--fetch-timeout', '60s'] });
  services.push(g);
  expect(await g.call('Create', { ID: 'idx', Parent: '' })).toEqual({});
  expect((await g.applyDiff('idx', '', tar)).Err).toBeUndefined();
  const miss = join(g.root, 'miss');
  const conn = missMount(miss);
  expect(conn, 'miss filesystem mounted').toBeDefined();
  stall = true;
  const seen = proxy!.seen.length;
  const r = reader(blobPath(miss, files['data/a']!));
  // The reader is blocked once its fetch reached the registry (and hangs there).
  const fetching = await waitFor(() => proxy!.seen.slice(seen).some((l) => l.includes(sha256hex(files['data/a']!))), 10_000, 50);
  expect(fetching, `no blob request seen\n${g.logTail()}`).toBe(true);
  return { g, miss, r };
}

/** The miss filesystem at miss is a dead mount: any access fails at once (never hangs). */
function expectDead(miss: string) {
  expect(() => statSync(join(miss, 'sha256'))).toThrow(/ENOTCONN|ECONNABORTED/);
}

async function expectRecovered(g: GearService, miss: string) {
  stall = false;
  await g.start();
  // Answers once the store is open (its miss filesystem mounted).
  expect((await g.call('Exists', { ID: 'idx' })).Exists).toBe(true);
  // The dead mount was replaced by a live one, and lazy reads work again.
  expect(missMount(miss)).toBeDefined();
  expect(statSync(join(miss, 'sha256')).isDirectory()).toBe(true);
  const got = await readFile(blobPath(miss, files['data/a']!));
  expect(sha256hex(got)).toBe(sha256hex(files['data/a']!));
}

describe('service exit', () => {
  it('gear daemon: a fatal error ends the process within 5 s, blocked readers get an error, a restart recovers', async (ctx) => {
    if (!available) return ctx.skip();
    const { g, miss, r } = await daemonWithBlockedReader({ GEAR_TEST_FAULTS: 'fatal-on-sigusr2' });
    const t0 = Date.now();
    process.kill(g.pid()!, 'SIGUSR2');
    const ended = await g.waitExit(5_000);
    expect(ended, `still alive 5 s after the fatal error\n${g.logTail(15)}`).toEqual({ code: 1, signal: null });
    expect(g.logTail(60)).toMatch(/uncaught exception; exiting/);
    const res = await Promise.race([r.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 5_000))]);
    expect(res, 'the blocked reader did not return').toBeDefined();
    expect(res!.code).not.toBe(0);
    expect(res!.stderr).toMatch(/Software caused connection abort|Transport endpoint is not connected|Input\/output error/);
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(await g.answers()).toBe(false);
    expectDead(miss);
    await expectRecovered(g, miss);
  }, 120_000);

  it('gear daemon: SIGTERM with a reader blocked on a fetch is an orderly exit 0; the reader gets an error', async (ctx) => {
    if (!available) return ctx.skip();
    const { g, miss, r } = await daemonWithBlockedReader({});
    process.kill(g.pid()!, 'SIGTERM');
    const ended = await g.waitExit(30_000);
    expect(ended, `still alive 30 s after SIGTERM\n${g.logTail(15)}`).toEqual({ code: 0, signal: null });
    const res = await Promise.race([r.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 5_000))]);
    expect(res?.code).not.toBe(0);
    await expectRecovered(g, miss);
  }, 120_000);

  it('gear daemon: an orderly shutdown (SIGINT) that hangs still ends the process after GEAR_SHUTDOWN_TIMEOUT', async (ctx) => {
    if (!available) return ctx.skip();
    const { g, miss, r } = await daemonWithBlockedReader({ GEAR_TEST_FAULTS: 'hang-shutdown', GEAR_SHUTDOWN_TIMEOUT: '1s' });
    process.kill(g.pid()!, 'SIGINT'); // the same stop as SIGTERM
    const ended = await g.waitExit(6_000);
    expect(ended, `still alive 6 s after SIGINT (bound 1 s)\n${g.logTail(15)}`).toEqual({ code: 1, signal: null });
    expect(g.logTail(60)).toMatch(/orderly shutdown did not finish in time/);
    const res = await Promise.race([r.done, new Promise<undefined>((res) => setTimeout(() => res(undefined), 5_000))]);
    expect(res?.code).not.toBe(0);
    expectDead(miss);
    await expectRecovered(g, miss);
  }, 120_000);

  it('gear snapshotter: a fatal error ends the process within 5 s and aborts its miss filesystem; a restart recovers', async (ctx) => {
    if (!available) return ctx.skip();
    const g = await startGearService({ kind: 'snapshotter', env: { GEAR_TEST_FAULTS: 'fatal-on-sigusr2' } });
    services.push(g);
    const miss = join(g.root, 'miss');
    const conn = missMount(miss);
    expect(conn).toBeDefined();
    process.kill(g.pid()!, 'SIGUSR2');
    const ended = await g.waitExit(5_000);
    expect(ended, `still alive 5 s after the fatal error\n${g.logTail(15)}`).toEqual({ code: 1, signal: null });
    // Aborted, not hung: any access fails at once.
    expectDead(miss);
    await g.start();
    // The snapshotter opens its store before it listens: the fresh mount is there once the socket answers.
    expect(missMount(miss)).toBeDefined();
    expect(statSync(join(miss, 'sha256')).isDirectory()).toBe(true);
  }, 120_000);
});
