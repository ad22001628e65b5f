/**
 * An ApplyDiff whose client stops sending (or goes away) mid-body, against
 * the real `gear daemon` process over its unix socket (real store; needs
 * root and dist/):
 * - Remove of the layer completes at once (it cancels the stalled upload),
 *   and the upload gets an `Err` reply;
 * - with a body idle timeout, the stalled upload fails by itself with
 *   DeadlineExceeded naming the setting, and frees the layer;
 * - a dropped connection leaves no half-applied layer.
 */
import fs from 'node:fs/promises';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tarStream from 'tar-stream';
import { afterEach, describe, expect, it } from 'vitest';
import { unmountAllUnder } from '../../src/core/sys/mounts.js';
import { post, rawRequest, startGearDaemon, type GearDaemon } from '../helpers/gear-daemon.js';

const L = '5'.repeat(64);
let dir: string | undefined;
let daemon: GearDaemon | undefined;

afterEach(async () => {
  await daemon?.stop();
  daemon = undefined;
  if (dir) {
    unmountAllUnder(dir);
    await fs.rm(dir, { recursive: true, force: true });
  }
  dir = undefined;
});

async function start(args: string[] = []): Promise<GearDaemon> {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-stall-'));
  daemon = await startGearDaemon({ dir, args });
  return daemon;
}

async function bigTar(): Promise<Buffer> {
  const pack = tarStream.pack();
  for (let i = 0; i < 64; i++) pack.entry({ name: `f${i}`, mode: 0o644 }, Buffer.alloc(16 * 1024, i));
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as unknown as AsyncIterable<Buffer>) chunks.push(c);
  return Buffer.concat(chunks);
}

async function json(d: GearDaemon, method: string, args: unknown, timeoutMs = 15_000): Promise<Record<string, unknown>> {
  const r = await rawRequest(d.socket, post(`/GraphDriver.${method}`, JSON.stringify(args)), timeoutMs);
  if (r.cut) throw new Error(`${method}: no reply within ${timeoutMs} ms\n${d.log()}`);
  expect(r.status).toBe(200);
  return JSON.parse(r.body.toString()) as Record<string, unknown>;
}

/** Starts a chunked ApplyDiff, sends `part` of the tar, then stalls (or, with `drop`, closes the connection). */
function stalledApplyDiff(d: GearDaemon, part: Buffer, opts: { drop?: boolean; timeoutMs?: number } = {}) {
  let sock: net.Socket | undefined;
  const reply = rawRequest(
    d.socket,
    (c) => {
      sock = c;
      c.write(`POST /GraphDriver.ApplyDiff?id=${L}&parent= HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n\r\n`);
      c.write(`${part.length.toString(16)}\r\n`);
      c.write(part);
      c.write('\r\n');
      if (opts.drop) setTimeout(() => c.destroy(), 200);
    },
    opts.timeoutMs ?? 20_000,
  );
  return { reply, socket: () => sock };
}

/** Waits (bounded) until the daemon has read the start of the body: the layer's `applying` marker is there. */
async function untilApplying(d: GearDaemon): Promise<void> {
  const marker = path.join(d.root, 'layers', L, 'applying');
  for (let i = 0; i < 200; i++) {
    if (await fs.stat(marker).then(() => true, () => false)) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`ApplyDiff never started: ${d.log()}`);
}

describe('a stalled ApplyDiff upload', () => {
  it('does not hold up Remove: the upload is cancelled with an Err and no layer is left', async () => {
    const d = await start(); // default idle timeout (120 s): far longer than this test waits
    expect(await json(d, 'Create', { ID: L })).toEqual({});
    const tar = await bigTar();
    const up = stalledApplyDiff(d, tar.subarray(0, 200_000));
    await untilApplying(d);

    const t0 = Date.now();
    expect(await json(d, 'Remove', { ID: L }, 10_000)).toEqual({});
    expect(Date.now() - t0).toBeLessThan(10_000); // a correctness bound: it did not wait for the 120 s timeout

    const r = await up.reply;
    expect(r.cut).toBe(false);
    const body = JSON.parse(r.body.toString()) as { Err?: string };
    expect(body.Err).toMatch(/^Unavailable: .*removed while this call was still transferring it/);
    expect(await fs.readdir(path.join(d.root, 'layers'))).toEqual([]);
    expect(d.alive()).toBe(true);
    expect(await json(d, 'Exists', { ID: L })).toEqual({ Exists: false });
  });

  it('fails by itself after the body idle timeout, naming the setting, and leaves the layer empty and usable', async () => {
    const d = await start(['--body-idle-timeout', '1s']);
    expect(await json(d, 'Create', { ID: L })).toEqual({});
    const tar = await bigTar();
    const up = stalledApplyDiff(d, tar.subarray(0, 200_000));
    const r = await up.reply; // bounded by 20 s
    expect(r.cut).toBe(false);
    const body = JSON.parse(r.body.toString()) as { Err?: string };
    expect(body.Err).toMatch(/^DeadlineExceeded: .*sent nothing for 1 s.*--body-idle-timeout.*GEAR_BODY_IDLE_TIMEOUT/);
    expect(await fs.readdir(path.join(d.root, 'layers', L, 'diff'))).toEqual([]);
    expect(await fs.readdir(path.join(d.root, 'layers', L))).not.toContain('applying');
    // The layer is free: Remove is immediate, or a whole ApplyDiff now succeeds.
    const ok = await rawRequest(d.socket, post(`/GraphDriver.ApplyDiff?id=${L}&parent=`, tar));
    expect(JSON.parse(ok.body.toString())).toEqual({ Size: 64 * 16 * 1024 });
    expect(await json(d, 'Remove', { ID: L })).toEqual({});
  });

  it('a connection dropped mid-body leaves no half-applied layer', async () => {
    const d = await start();
    expect(await json(d, 'Create', { ID: L })).toEqual({});
    const tar = await bigTar();
    const up = stalledApplyDiff(d, tar.subarray(0, 300_000), { drop: true });
    const r = await up.reply;
    expect(r.cut).toBe(true); // we closed it ourselves
    // The daemon notices and rolls back; wait (bounded) for the marker to go.
    const layerDir = path.join(d.root, 'layers', L);
    for (let i = 0; i < 200 && (await fs.readdir(layerDir)).includes('applying'); i++) await new Promise((res) => setTimeout(res, 25));
    expect(await fs.readdir(layerDir), d.log()).not.toContain('applying');
    expect(await fs.readdir(path.join(layerDir, 'diff'))).toEqual([]);
    const ok = await rawRequest(d.socket, post(`/GraphDriver.ApplyDiff?id=${L}&parent=`, tar));
    expect(JSON.parse(ok.body.toString())).toEqual({ Size: 64 * 16 * 1024 });
    expect(d.alive()).toBe(true);
  });
});
