/**
 * Every snapshotter gRPC call ends with a reply or a status:
 * - the handler wrappers (handlers.ts) turn a throw anywhere in a handler's
 *   work, its result encoding included, into a status instead of a call that
 *   hangs until its deadline;
 * - racing calls on the same keys (Prepare/Remove, Commit/Remove, View/Remove,
 *   Stat/Usage/Mounts/List during removals) against the real snapshotter
 *   server over its unix socket (real store; needs root) all get a reply or a
 *   proper status, and the server keeps serving.
 */
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { invalidArgument } from '../../src/core/errors.js';
import { silentLogger } from '../../src/core/log.js';
import { unmountAllUnder } from '../../src/core/sys/mounts.js';
import { streamHandler, unaryHandler } from '../../src/frontends/snapshotter/handlers.js';
import { PROTO_DIR, startSnapshotterServer, type SnapshotterServer } from '../../src/frontends/snapshotter/server.js';
import { Snapshotter, type SnapshotLayers } from '../../src/frontends/snapshotter/snapshotter.js';

const def = protoLoader.loadSync('containerd/services/snapshots/v1/snapshots.proto', {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const Snapshots = (grpc.loadPackageDefinition(def) as unknown as {
  containerd: { services: { snapshots: { v1: { Snapshots: grpc.ServiceClientConstructor } } } };
}).containerd.services.snapshots.v1.Snapshots;

type Client = grpc.Client & Record<string, (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res: unknown) => void) => void> & {
  List(req: unknown, md: grpc.Metadata, opts: grpc.CallOptions): grpc.ClientReadableStream<unknown>;
};

let dir: string;
let servers: Array<{ close(): Promise<void> }> = [];
let clients: grpc.Client[] = [];

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-snrobust-'));
});
afterEach(async () => {
  for (const c of clients) c.close();
  for (const s of servers) await s.close();
  clients = [];
  servers = [];
  unmountAllUnder(dir);
  await fs.rm(dir, { recursive: true, force: true });
});

function client(socket: string): Client {
  const c = new Snapshots(`unix://${socket}`, grpc.credentials.createInsecure()) as unknown as Client;
  clients.push(c);
  return c;
}

type Result = { ok: unknown } | { code: number; details: string };

function unaryCall(c: Client, rpc: string, req: unknown, deadlineMs = 10_000): Promise<Result> {
  const md = new grpc.Metadata();
  md.set('containerd-namespace', 'default');
  return new Promise((resolve) =>
    c[rpc]!(req, md, { deadline: Date.now() + deadlineMs }, (err, res) => resolve(err ? { code: err.code, details: err.details } : { ok: res })),
  );
}

function listCall(c: Client, deadlineMs = 10_000): Promise<Result> {
  const md = new grpc.Metadata();
  md.set('containerd-namespace', 'default');
  return new Promise((resolve) => {
    const msgs: unknown[] = [];
    const s = c.List({ filters: [] }, md, { deadline: Date.now() + deadlineMs });
    s.on('data', (m) => msgs.push(m));
    s.on('error', (err: grpc.ServiceError) => resolve({ code: err.code, details: err.details }));
    s.on('end', () => resolve({ ok: msgs }));
  });
}

describe('snapshotter handler wrappers', () => {
  it('a throw while building the reply or the stream messages is a status, not a hang', async () => {
    const socket = path.join(dir, 'h.sock');
    const log = silentLogger();
    const server = new grpc.Server();
    const bad = () => {
      throw invalidArgument('cannot encode this snapshot');
    };
    server.addService(Snapshots.service, {
      // Encoding fails after the work (as infoToWire would on a bad timestamp).
      Stat: unaryHandler(log, 'Stat', async () => ({ info: bad() })),
      // A handler that is not async and throws at once.
      Mounts: unaryHandler(log, 'Mounts', (() => bad()) as unknown as () => Promise<never>),
      List: streamHandler(log, 'List', async () => [{ info: [] }, bad()]),
      Usage: unaryHandler(log, 'Usage', async () => ({ size: '1', inodes: '2' })),
    });
    await new Promise<void>((res, rej) => server.bindAsync(`unix://${socket}`, grpc.ServerCredentials.createInsecure(), (e) => (e ? rej(e) : res())));
    servers.push({ close: () => new Promise<void>((r) => server.tryShutdown(() => r())) });
    const c = client(socket);
    for (const rpc of ['Stat', 'Mounts']) {
      expect(await unaryCall(c, rpc, { key: 'k' }, 5000), rpc).toEqual({ code: grpc.status.INVALID_ARGUMENT, details: 'cannot encode this snapshot' });
    }
    expect(await listCall(c, 5000)).toEqual({ code: grpc.status.INVALID_ARGUMENT, details: 'cannot encode this snapshot' });
    expect(await unaryCall(c, 'Usage', { key: 'k' })).toEqual({ ok: { size: '1', inodes: '2' } });
  });
});

describe('racing snapshotter calls on the real server', () => {
  it('every call gets a reply or a proper status, and the server keeps serving', async () => {
    const socket = path.join(dir, 'sn.sock');
    const sn: SnapshotterServer = await startSnapshotterServer({ socket, root: path.join(dir, 'root'), logger: silentLogger() });
    servers.push(sn);
    const c = client(socket);
    const proper = (r: Result, what: string) => {
      if ('code' in r) expect([grpc.status.NOT_FOUND, grpc.status.ALREADY_EXISTS, grpc.status.FAILED_PRECONDITION, grpc.status.INVALID_ARGUMENT], `${what}: ${r.details}`).toContain(r.code);
    };
    for (let i = 0; i < 15; i++) {
      const key = `extract-${i}`;
      const name = `layer-${i}`;
      const rs = await Promise.all([
        unaryCall(c, 'Prepare', { key, parent: '' }),
        unaryCall(c, 'Remove', { key }),
        unaryCall(c, 'Stat', { key }),
        unaryCall(c, 'Usage', { key }),
        unaryCall(c, 'Mounts', { key }),
        listCall(c),
      ]);
      rs.forEach((r, k) => proper(r, `round ${i} call ${k}`));
      // Commit racing Remove of the active snapshot, then View racing Remove of the committed one.
      await unaryCall(c, 'Prepare', { key, parent: '' });
      const [cm, rm] = await Promise.all([unaryCall(c, 'Commit', { name, key }), unaryCall(c, 'Remove', { key })]);
      proper(cm, `Commit ${i}`);
      proper(rm, `Remove ${i}`);
      const [vw, rm2] = await Promise.all([unaryCall(c, 'View', { key: `view-${i}`, parent: name }), unaryCall(c, 'Remove', { key: name })]);
      proper(vw, `View ${i}`);
      proper(rm2, `Remove committed ${i}`);
      await unaryCall(c, 'Remove', { key: `view-${i}` });
      await unaryCall(c, 'Remove', { key: name });
      await unaryCall(c, 'Remove', { key });
    }
    const list = await listCall(c);
    expect(list).toEqual({ ok: [] });
    expect(await unaryCall(c, 'Cleanup', {})).toEqual({ ok: {} });
  });
});

describe('a refused Prepare or View', () => {
  it('leaves no snapshot and no layer behind (a chain too long to mount)', async () => {
    const layers = new Map<string, string>();
    // A fake store whose every layer is a Gear index layer with a very long path: mounts above it are refused.
    const fake: SnapshotLayers = {
      create: async (id, parent) => void layers.set(id, parent),
      remove: async (id) => void layers.delete(id),
      exists: async (id) => layers.has(id),
      metadata: async (id) => ({ UpperDir: path.join(dir, id, 'diff'), WorkDir: path.join(dir, id, 'work') }),
      adoptIndexForm: async () => undefined,
      lowerOf: (id) => ({ dir: path.join(dir, id), short: `/l/${id}`, gear: true }),
      get dataLowers() {
        return [path.join(dir, 'p'.repeat(4000))];
      },
    };
    const sn = await Snapshotter.open({ layers: fake, metaRoot: path.join(dir, 'meta') });
    await sn.prepare('base-extract', '');
    await sn.commit('base', 'base-extract');
    expect(layers.size).toBe(1);
    for (const verb of ['prepare', 'view'] as const) {
      await expect(sn[verb](`top-${verb}`, 'base')).rejects.toThrow(/overlay options, over containerd's/);
      await expect(sn.stat(`top-${verb}`)).rejects.toThrow(/not found|no such/i);
      expect((await sn.list([])).map((i) => i.name)).toEqual(['base']);
      expect(layers.size).toBe(1);
    }
    // The key is free again.
    await expect(sn.prepare('top-prepare', 'base')).rejects.toThrow(/overlay options/);
    await sn.drain();
  });
});
