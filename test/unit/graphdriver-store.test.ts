/**
 * The graph-driver server over the real layer store (overlay mounts; needs
 * root), driven over its unix socket as dockerd drives it: pull two layers,
 * create a container's -init and rw layers, mount, write, diff, unmount,
 * remove. graphdriver-protocol.test.ts covers the wire details with a fake.
 */
import { existsSync } from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tarStream from 'tar-stream';
import { Client } from 'undici';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../src/core/log.js';
import { isMountPoint, mountsUnder, unmountAllUnder } from '../../src/core/sys/mounts.js';
import { startGraphDriverServer, type GraphDriverServer } from '../../src/frontends/graphdriver/server.js';

const MIME = 'application/vnd.docker.plugins.v1.2+json';
const BASE = '1'.repeat(64);
const TOP = '2'.repeat(64);
const CTR = '3'.repeat(64);
const INIT = `${CTR}-init`;

type Entry = { name: string; body?: string; type?: 'file' | 'directory' };

function tarOf(entries: Entry[]): Readable {
  const pack = tarStream.pack();
  for (const e of entries) {
    if (e.type === 'directory') pack.entry({ name: e.name, type: 'directory', mode: 0o755 });
    else pack.entry({ name: e.name, mode: 0o644 }, e.body ?? '');
  }
  pack.finalize();
  return Readable.from(pack as unknown as AsyncIterable<Buffer>);
}

/** Names and bodies of the regular files and whiteouts in a tar. */
async function readTar(body: AsyncIterable<Buffer>): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const extract = tarStream.extract();
  const done = (async () => {
    for await (const entry of extract) {
      const chunks: Buffer[] = [];
      for await (const c of entry as AsyncIterable<Buffer>) chunks.push(c);
      if (entry.header.type === 'file') out[entry.header.name] = Buffer.concat(chunks).toString();
    }
  })();
  await Promise.all([pipeline(Readable.from(body), extract), done]);
  return out;
}

let dir: string;
let home: string;
let socket: string;
let server: GraphDriverServer | undefined;
let client: Client | undefined;

async function call(method: string, args: unknown): Promise<Record<string, unknown>> {
  const res = await client!.request({
    method: 'POST',
    path: `/GraphDriver.${method}`,
    headers: { accept: MIME },
    body: JSON.stringify(args) + '\n',
  });
  expect(res.statusCode).toBe(200);
  return (await res.body.json()) as Record<string, unknown>;
}

async function applyDiff(id: string, parent: string, tar: Readable): Promise<Record<string, unknown>> {
  const res = await client!.request({
    method: 'POST',
    path: `/GraphDriver.ApplyDiff?id=${id}&parent=${parent}`,
    headers: { accept: MIME },
    body: tar,
  });
  return (await res.body.json()) as Record<string, unknown>;
}

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-gdstore-'));
  home = path.join(dir, 'docker', 'gear');
  socket = path.join(dir, 'gear.sock');
  server = await startGraphDriverServer({ socket, logger: silentLogger() });
  client = new Client('http://localhost', { socketPath: socket });
});

afterEach(async () => {
  await client?.close().catch(() => undefined);
  await server?.close();
  client = undefined;
  server = undefined;
  unmountAllUnder(dir); // whatever a failed assertion left mounted
  await fs.rm(dir, { recursive: true, force: true });
});

describe('graph driver over the real layer store', () => {
  it('runs a pull, container create, mount, diff and remove cycle', async () => {
    expect(await call('Init', { Home: home, Opts: null, UIDMaps: null, GIDMaps: null })).toEqual({});
    expect(await call('Capabilities', {})).toEqual({ Capabilities: { ReproducesExactDiffs: false } });

    // Pull: Create + ApplyDiff per layer.
    expect(await call('Create', { ID: BASE, Parent: '' })).toEqual({});
    const baseSize = await applyDiff(
      BASE,
      '',
      tarOf([{ name: 'etc/', type: 'directory' }, { name: 'etc/a', body: 'base-a' }, { name: 'etc/b', body: 'base-b' }]),
    );
    expect(baseSize).toEqual({ Size: expect.any(Number) });
    expect(await call('Create', { ID: TOP, Parent: BASE })).toEqual({});
    expect(await applyDiff(TOP, BASE, tarOf([{ name: 'etc/', type: 'directory' }, { name: 'etc/a', body: 'top-a' }, { name: 'etc/.wh.b' }]))).toEqual({
      Size: expect.any(Number),
    });

    // Container: -init layer (dockerd writes /etc/hosts etc. into it), then the rw layer.
    expect(await call('CreateReadWrite', { ID: INIT, Parent: TOP, MountLabel: '', StorageOpt: {} })).toEqual({});
    const initDir = (await call('Get', { ID: INIT, MountLabel: '' })).Dir as string;
    await fs.writeFile(path.join(initDir, 'etc/hosts'), '127.0.0.1 localhost\n');
    expect(await call('Put', { ID: INIT })).toEqual({});
    expect(await call('CreateReadWrite', { ID: CTR, Parent: INIT, MountLabel: '', StorageOpt: {} })).toEqual({});
    expect(await call('Exists', { ID: CTR })).toEqual({ Exists: true });

    const rootfs = (await call('Get', { ID: CTR, MountLabel: '' })).Dir as string;
    expect(path.isAbsolute(rootfs)).toBe(true);
    expect(isMountPoint(rootfs)).toBe(true);
    expect(await fs.readFile(path.join(rootfs, 'etc/a'), 'utf8')).toBe('top-a');
    expect(existsSync(path.join(rootfs, 'etc/b'))).toBe(false);
    expect(await fs.readFile(path.join(rootfs, 'etc/hosts'), 'utf8')).toBe('127.0.0.1 localhost\n');
    await fs.writeFile(path.join(rootfs, 'etc/new'), 'written by the container');

    const meta = (await call('GetMetadata', { ID: CTR })).Metadata as Record<string, string>;
    expect(meta.MergedDir).toBe(rootfs);
    const status = (await call('Status', {})).Status as Array<[string, string]>;
    expect(status).toContainEqual(['Root', home]);

    // docker commit / docker diff of the container layer against its -init parent.
    const diffRes = await client!.request({
      method: 'POST',
      path: '/GraphDriver.Diff',
      headers: { accept: MIME },
      body: JSON.stringify({ ID: CTR, Parent: INIT }) + '\n',
    });
    expect(diffRes.statusCode).toBe(200);
    expect(await readTar(diffRes.body as AsyncIterable<Buffer>)).toEqual({ 'etc/new': 'written by the container' });
    expect(await call('Changes', { ID: CTR, Parent: INIT })).toEqual({
      Changes: expect.arrayContaining([{ Path: '/etc/new', Kind: 1 }]),
    });
    expect(await call('DiffSize', { ID: CTR, Parent: INIT })).toEqual({ Size: 'written by the container'.length });

    expect(await call('Put', { ID: CTR })).toEqual({});
    expect(isMountPoint(rootfs)).toBe(false);

    // Container and image removal, then dockerd's shutdown.
    for (const id of [CTR, INIT, TOP, BASE]) expect(await call('Remove', { ID: id })).toEqual({});
    expect(await call('Exists', { ID: BASE })).toEqual({ Exists: false });
    expect(await call('Get', { ID: BASE })).toEqual({ Err: expect.stringMatching(/^NotFound: .*1{64}/) });
    expect(await call('Cleanup', {})).toEqual({});
    expect(mountsUnder(dir)).toEqual([]);
  });

  it('a daemon stop leaves a container mounted; dockerd Cleanup unmounts it', async () => {
    await call('Init', { Home: home });
    await call('Create', { ID: BASE, Parent: '' });
    await applyDiff(BASE, '', tarOf([{ name: 'f', body: 'x' }]));
    await call('CreateReadWrite', { ID: CTR, Parent: BASE });
    const rootfs = (await call('Get', { ID: CTR })).Dir as string;
    await client!.close();
    await server!.close();
    expect(isMountPoint(rootfs)).toBe(true); // running containers keep their rootfs

    server = await startGraphDriverServer({ socket, logger: silentLogger() });
    client = new Client('http://localhost', { socketPath: socket });
    await call('Init', { Home: home });
    expect(await fs.readFile(path.join(rootfs, 'f'), 'utf8')).toBe('x');
    expect(await call('Cleanup', {})).toEqual({});
    expect(isMountPoint(rootfs)).toBe(false);
  });
});
