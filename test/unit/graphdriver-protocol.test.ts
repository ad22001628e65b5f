/**
 * The graph-driver plugin's wire protocol, driven the way dockerd drives it:
 * raw HTTP/1.1 over a unix socket, POST only, no Content-Type, JSON `null`
 * for Activate, `Accept: application/vnd.docker.plugins.v1.2+json`, the
 * ApplyDiff tar as a chunked request body with unescaped query values.
 *
 * The store behind the server is an in-memory fake: this file tests protocol
 * logic only (graphdriver-store.test.ts runs the same server over the real
 * store).
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import pino from 'pino';
import { Client } from 'undici';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ChangeKind, type Change } from '../../src/core/archive/changes.js';
import { alreadyExists, failedPrecondition, invalidArgument, notFound } from '../../src/core/errors.js';
import { silentLogger } from '../../src/core/log.js';
import type { CreateOptions, LayerKind, LayerStore } from '../../src/core/layers/types.js';
import type { StoreOpener } from '../../src/frontends/graphdriver/driver.js';
import { startGraphDriverServer, type GraphDriverServer } from '../../src/frontends/graphdriver/server.js';

const MIME = 'application/vnd.docker.plugins.v1.2+json';
const ID = 'a'.repeat(64);
const ID2 = '3f2a'.padEnd(64, '0');
const CID = 'c0ffee'.padEnd(64, '1');

function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void } {
  let resolve!: (v: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([p, new Promise<T>((_, rej) => setTimeout(() => rej(new Error(`timed out: ${what}`)), ms))]);
}

interface FakeLayer {
  parent: string;
  kind: LayerKind;
  data: Buffer;
  mounts: number;
}

/** An in-memory LayerStore with hooks to observe streaming. */
class FakeStore implements LayerStore {
  readonly layers = new Map<string, FakeLayer>();
  readonly calls: string[] = [];
  /** Bytes applyDiff has received so far, counted as they arrive. */
  applied = 0;
  readonly firstApplyBytes = deferred();
  /** When set, diff() streams this instead of the layer data. */
  diffStream?: () => Readable;
  /** When set, get() waits for it (in-flight request at shutdown). */
  getGate?: Promise<void>;
  cleanups = 0;
  closed = false;

  constructor(readonly root: string) {}

  #layer(id: string): FakeLayer {
    const l = this.layers.get(id);
    if (!l) throw notFound(`layer ${id}: no such layer`);
    return l;
  }

  async create(id: string, parent: string, kind: LayerKind, opts?: CreateOptions): Promise<void> {
    this.calls.push(`create ${id} ${parent} ${kind}${opts?.storageOpt ? ' ' + JSON.stringify(opts.storageOpt) : ''}`);
    if (this.layers.has(id)) throw alreadyExists(`layer ${id}: already exists`);
    if (parent && !this.layers.has(parent)) throw notFound(`parent layer ${parent}: no such layer`);
    if (opts?.storageOpt?.size) throw invalidArgument('storage option "size": not supported');
    this.layers.set(id, { parent, kind, data: Buffer.alloc(0), mounts: 0 });
  }
  async remove(id: string): Promise<void> {
    this.calls.push(`remove ${id}`);
    this.layers.delete(id);
  }
  async exists(id: string): Promise<boolean> {
    return this.layers.has(id);
  }
  async get(id: string): Promise<string> {
    this.calls.push(`get ${id}`);
    const l = this.#layer(id);
    if (this.getGate) await this.getGate;
    if (id === 'explodes') throw new Error('boom: something unexpected');
    l.mounts++;
    return path.join(this.root, 'layers', id, 'merged');
  }
  async put(id: string): Promise<void> {
    this.calls.push(`put ${id}`);
    const l = this.#layer(id);
    if (l.mounts === 0) throw failedPrecondition(`layer ${id}: not mounted`);
    l.mounts--;
  }
  async metadata(id: string): Promise<Record<string, string>> {
    this.#layer(id);
    const dir = path.join(this.root, 'layers', id);
    return { UpperDir: `${dir}/diff`, WorkDir: `${dir}/work`, MergedDir: `${dir}/merged` };
  }
  async status(): Promise<Array<[string, string]>> {
    return [
      ['Backing Filesystem', 'fake'],
      ['Layers', String(this.layers.size)],
    ];
  }
  async cleanup(): Promise<void> {
    this.cleanups++;
  }
  async close(): Promise<void> {
    this.closed = true;
  }
  async applyDiff(id: string, parent: string, tar: Readable): Promise<number> {
    this.calls.push(`applyDiff ${id} ${parent}`);
    const l = this.#layer(id);
    if (l.parent !== parent) throw invalidArgument(`layer ${id}: parent is ${JSON.stringify(l.parent)}`);
    const kept: Buffer[] = [];
    for await (const chunk of tar as AsyncIterable<Buffer>) {
      this.applied += chunk.length;
      this.firstApplyBytes.resolve();
      if (kept.length < 4) kept.push(chunk);
    }
    l.data = Buffer.concat(kept);
    return this.applied;
  }
  async diff(id: string, parent: string): Promise<Readable> {
    this.calls.push(`diff ${id} ${parent}`);
    const l = this.#layer(id);
    return this.diffStream ? this.diffStream() : Readable.from([l.data]);
  }
  async changes(id: string, parent: string): Promise<Change[]> {
    this.calls.push(`changes ${id} ${parent}`);
    this.#layer(id);
    return [
      { path: '/etc/hosts', kind: ChangeKind.Modify },
      { path: '/new', kind: ChangeKind.Add },
      { path: '/gone', kind: ChangeKind.Delete },
    ];
  }
  async diffSize(id: string, parent: string): Promise<number> {
    this.calls.push(`diffSize ${id} ${parent}`);
    return this.#layer(id).data.length;
  }
}

interface Reply {
  status: number;
  contentType: string | undefined;
  text: string;
  json: unknown;
}

let dir: string;
let socket: string;
let server: GraphDriverServer | undefined;
let client: Client | undefined;
let stores: FakeStore[];
let opened: string[];

const opener: StoreOpener = async ({ root }) => {
  opened.push(root);
  const s = new FakeStore(root);
  stores.push(s);
  return s;
};

async function start(opts: { root?: string; shutdownTimeoutMs?: number } = {}): Promise<void> {
  server = await startGraphDriverServer({ socket, logger: silentLogger(), openStore: opener, ...opts });
  client = new Client('http://localhost', { socketPath: socket });
}

/** POSTs like dockerd's plugin client: Accept header, no Content-Type. */
async function post(pathAndQuery: string, body?: string | Readable | null): Promise<Reply> {
  const res = await client!.request({
    method: 'POST',
    path: pathAndQuery,
    headers: { accept: MIME },
    body: body ?? undefined,
  });
  const text = await res.body.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  const ct = res.headers['content-type'];
  return { status: res.statusCode, contentType: Array.isArray(ct) ? ct[0] : ct, text, json };
}

/** A JSON call as Go's json.Encoder writes it (with the trailing newline). */
const call = (method: string, args: unknown): Promise<Reply> => post(`/GraphDriver.${method}`, JSON.stringify(args) + '\n');

async function init(home = path.join(dir, 'home', 'gear')): Promise<void> {
  const r = await call('Init', { Home: home, Opts: null, UIDMaps: null, GIDMaps: null });
  expect(r.json).toEqual({});
}

beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'gear-gd-'));
  socket = path.join(dir, 'run', 'gear.sock');
  stores = [];
  opened = [];
});

afterEach(async () => {
  await client?.close().catch(() => undefined);
  await server?.close();
  client = undefined;
  server = undefined;
  await rm(dir, { recursive: true, force: true });
});

describe('handshake', () => {
  it('Activate with the JSON null body dockerd sends answers Implements GraphDriver', async () => {
    await start();
    const r = await post('/Plugin.Activate', 'null\n');
    expect(r.status).toBe(200);
    expect(r.contentType).toBe(MIME);
    expect(r.text).toBe('{"Implements":["GraphDriver"]}');
  });

  it('answers a byte-exact Go client request (no Content-Type, Accept-Encoding gzip)', async () => {
    await start();
    const raw = await new Promise<string>((resolve, reject) => {
      const conn = net.connect(socket);
      let out = '';
      conn.on('data', (d) => (out += d.toString()));
      conn.on('end', () => resolve(out));
      conn.on('error', reject);
      conn.write(
        'POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\nUser-Agent: Go-http-client/1.1\r\n' +
          `Content-Length: 5\r\nAccept: ${MIME}\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\nnull\n`,
      );
    });
    expect(raw).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    expect(raw).toContain(`Content-Type: ${MIME}\r\n`);
    expect(raw.endsWith('\r\n\r\n{"Implements":["GraphDriver"]}')).toBe(true);
  });

  it('Capabilities is wrapped in a Capabilities object and reports inexact diffs', async () => {
    await start();
    const r = await call('Capabilities', {});
    expect(r.text).toBe('{"Capabilities":{"ReproducesExactDiffs":false}}');
    expect(r.contentType).toBe(MIME);
  });

  it('an unknown method is a 404 with Err (dockerd accepts 404 for optional methods)', async () => {
    await start();
    const r = await call('Frobnicate', {});
    expect(r.status).toBe(404);
    expect(r.json).toEqual({ Err: 'Unimplemented: POST /GraphDriver.Frobnicate: no such plugin method' });
  });
});

describe('Init', () => {
  it('a call before Init answers Err and the daemon keeps serving', async () => {
    await start();
    const r = await call('Create', { ID, Parent: '' });
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ Err: 'FailedPrecondition: GraphDriver.Init has not been called yet: no store root' });
    expect(opened).toEqual([]);
    await init();
    expect((await call('Create', { ID, Parent: '' })).json).toEqual({});
  });

  it('opens the store at Home, and reopens only when Home changes', async () => {
    await start();
    const home = path.join(dir, 'docker', 'gear');
    await init(home);
    await init(home);
    expect(opened).toEqual([home]);
    await call('Create', { ID, Parent: '' });
    const other = path.join(dir, 'docker2', 'gear');
    await init(other);
    expect(opened).toEqual([home, other]);
    expect(stores.map((st) => st.closed)).toEqual([true, false]);
    expect(stores[0]!.cleanups).toBe(0); // closing releases resources, never unmounts
    expect((await call('Exists', { ID })).json).toEqual({ Exists: false });
  });

  it('with --root, uses it instead of Home and works without Init', async () => {
    const root = path.join(dir, 'root');
    await start({ root });
    expect((await call('Create', { ID, Parent: '' })).json).toEqual({});
    await init(path.join(dir, 'elsewhere'));
    expect(opened).toEqual([root]);
  });

  it('refuses userns-remap id maps with a clear error', async () => {
    await start();
    const maps = [{ container_id: 0, host_id: 100000, size: 65536 }];
    const r = await call('Init', { Home: path.join(dir, 'h'), Opts: [], UIDMaps: maps, GIDMaps: maps });
    expect(r.json).toEqual({
      Err:
        'FailedPrecondition: user namespace remapping (dockerd --userns-remap) is not supported yet: ' +
        'Init sent non-empty UIDMaps/GIDMaps',
    });
    expect(opened).toEqual([]);
  });

  it('refuses storage options and a relative Home', async () => {
    await start();
    expect((await call('Init', { Home: path.join(dir, 'h'), Opts: ['overlay2.size=1G'] })).json).toEqual({
      Err: 'InvalidArgument: storage option "overlay2.size=1G": not supported by gear',
    });
    expect((await call('Init', { Home: 'var/lib/docker/gear' })).json).toEqual({
      Err: 'InvalidArgument: Init: Home "var/lib/docker/gear" is not absolute',
    });
    expect((await call('Init', { Home: path.join(dir, 'h'), UIDMaps: 'x' })).json).toEqual({
      Err: 'InvalidArgument: UIDMaps must be an array or null',
    });
  });
});

describe('layer calls', () => {
  beforeEach(async () => {
    await start();
    await init();
  });

  it('answers every JSON endpoint with the exact moby reply shape', async () => {
    const store = () => stores[0]!;
    expect((await call('Create', { ID, Parent: '', MountLabel: '', StorageOpt: null })).text).toBe('{}');
    expect((await call('Create', { ID: ID2, Parent: ID, StorageOpt: { foo: 'bar' } })).text).toBe('{}');
    expect((await call('CreateReadWrite', { ID: `${CID}-init`, Parent: ID2 })).text).toBe('{}');
    expect((await call('CreateReadWrite', { ID: CID, Parent: `${CID}-init` })).text).toBe('{}');
    expect(store().calls.slice(0, 4)).toEqual([
      `create ${ID}  ro`,
      `create ${ID2} ${ID} ro {"foo":"bar"}`,
      `create ${CID}-init ${ID2} rw`,
      `create ${CID} ${CID}-init rw`,
    ]);

    expect((await call('Exists', { ID })).text).toBe('{"Exists":true}');
    expect((await call('Exists', { ID: 'b'.repeat(64) })).text).toBe('{"Exists":false}');

    const dirReply = await call('Get', { ID: CID, MountLabel: '' });
    expect(dirReply.json).toEqual({ Dir: path.join(store().root, 'layers', CID, 'merged') });
    expect(dirReply.contentType).toBe(MIME);
    expect((await call('Put', { ID: CID })).text).toBe('{}');

    expect((await call('GetMetadata', { ID: CID })).json).toEqual({
      Metadata: {
        UpperDir: path.join(store().root, 'layers', CID, 'diff'),
        WorkDir: path.join(store().root, 'layers', CID, 'work'),
        MergedDir: path.join(store().root, 'layers', CID, 'merged'),
      },
    });
    expect((await call('Status', {})).text).toBe('{"Status":[["Backing Filesystem","fake"],["Layers","4"]]}');
    expect((await call('Changes', { ID: CID, Parent: `${CID}-init` })).text).toBe(
      '{"Changes":[{"Path":"/etc/hosts","Kind":0},{"Path":"/new","Kind":1},{"Path":"/gone","Kind":2}]}',
    );
    expect((await call('DiffSize', { ID: CID, Parent: `${CID}-init` })).text).toBe('{"Size":0}');
    expect((await call('Remove', { ID: CID })).text).toBe('{}');
    expect((await call('Remove', { ID: CID })).text).toBe('{}'); // removal of an unknown id succeeds
    expect((await call('Cleanup', {})).text).toBe('{}');
    expect(store().cleanups).toBe(1);
  });

  it('maps core errors to Err with the class prefix and the cause', async () => {
    expect((await call('Get', { ID: ID2 })).json).toEqual({ Err: `NotFound: layer ${ID2}: no such layer` });
    await call('Create', { ID, Parent: '' });
    expect((await call('Create', { ID, Parent: '' })).json).toEqual({ Err: `AlreadyExists: layer ${ID}: already exists` });
    expect((await call('Create', { ID: ID2, Parent: 'f'.repeat(64) })).json).toEqual({
      Err: `NotFound: parent layer ${'f'.repeat(64)}: no such layer`,
    });
    expect((await call('Create', { ID: ID2, Parent: ID, StorageOpt: { size: '10G' } })).json).toEqual({
      Err: 'InvalidArgument: storage option "size": not supported',
    });
    expect((await call('Put', { ID })).json).toEqual({ Err: `FailedPrecondition: layer ${ID}: not mounted` });
  });

  it('an unexpected exception in the store is Internal, and the daemon keeps serving', async () => {
    await call('Create', { ID: 'explodes', Parent: '' });
    const r = await call('Get', { ID: 'explodes' });
    expect(r.status).toBe(200);
    expect(r.json).toEqual({ Err: 'Internal: boom: something unexpected' });
    expect((await call('Exists', { ID: 'explodes' })).json).toEqual({ Exists: true });
  });

  it.each([
    ['malformed JSON', '{"ID": ', /^InvalidArgument: malformed JSON body: /],
    ['a JSON array', '[1,2]', /^InvalidArgument: request body must be a JSON object, got array$/],
    ['null', 'null', /^InvalidArgument: missing ID$/],
    ['an empty body', '', /^InvalidArgument: missing ID$/],
    ['no ID', '{"Parent":""}', /^InvalidArgument: missing ID$/],
    ['a numeric ID', '{"ID":42}', /^InvalidArgument: ID must be a string$/],
    ['an ID with a slash', '{"ID":"a/b"}', /^InvalidArgument: ID "a\/b": not a valid layer id$/],
    ['an ID with ..', '{"ID":"a..b"}', /^InvalidArgument: ID "a\.\.b": not a valid layer id$/],
    ['the ID ..', '{"ID":".."}', /^InvalidArgument: ID "\.\.": not a valid layer id$/],
    ['an ID starting with a dot', '{"ID":".hidden"}', /^InvalidArgument: ID "\.hidden": not a valid layer id$/],
    ['a 129-char ID', `{"ID":"${'a'.repeat(129)}"}`, /^InvalidArgument: ID "a+…": not a valid layer id$/],
    ['a bad Parent', `{"ID":"${ID}","Parent":"../x"}`, /^InvalidArgument: Parent "\.\.\/x": not a valid layer id$/],
    ['a non-string MountLabel', `{"ID":"${ID}","MountLabel":1}`, /^InvalidArgument: MountLabel must be a string$/],
    ['a bad StorageOpt', `{"ID":"${ID}","StorageOpt":{"a":1}}`, /^InvalidArgument: StorageOpt "a" must be a string$/],
  ])('answers Err for %s and keeps serving', async (_what, body, err) => {
    const r = await post('/GraphDriver.Create', body);
    expect(r.status).toBe(200);
    expect(r.contentType).toBe(MIME);
    expect(Object.keys(r.json as object)).toEqual(['Err']);
    expect((r.json as { Err: string }).Err).toMatch(err);
    expect(stores[0]!.calls).toEqual([]);
    expect((await call('Capabilities', {})).status).toBe(200);
  });

  it('answers Err for an oversized JSON body and keeps the connection usable', async () => {
    const r = await post('/GraphDriver.Create', JSON.stringify({ ID, Pad: 'x'.repeat(2 << 20) }));
    expect(r.json).toEqual({ Err: expect.stringMatching(/^InvalidArgument: request body of \d+ bytes is larger than 1048576 bytes$/) });
    expect(stores[0]!.calls).toEqual([]);
    expect((await call('Exists', { ID })).json).toEqual({ Exists: false });
  });

  it('accepts "-init" ids and ids with dots and underscores', async () => {
    for (const id of [`${CID}-init`, 'my_layer.v1', 'A'.repeat(128)]) {
      expect((await call('CreateReadWrite', { ID: id, Parent: '' })).json).toEqual({});
    }
  });
});

describe('ApplyDiff', () => {
  beforeEach(async () => {
    await start();
    await init();
    await call('Create', { ID, Parent: '' });
    await call('Create', { ID: `${CID}-init`, Parent: ID });
  });

  it.each([
    [`?id=${ID}&parent=`, ID, ''],
    [`?id=${ID}`, ID, ''],
    [`?id=${CID}-init&parent=${ID}`, `${CID}-init`, ID],
    [`?parent=${ID}&id=${CID}-init`, `${CID}-init`, ID],
    [`?id=${CID}%2Dinit&parent=${ID}`, `${CID}-init`, ID],
  ])('reads unescaped query %s', async (query, id, parent) => {
    const r = await post(`/GraphDriver.ApplyDiff${query}`, Readable.from([Buffer.from('tar bytes')]));
    expect(r.json).toEqual({ Size: 9 });
    expect(stores[0]!.calls.at(-1)).toBe(`applyDiff ${id} ${parent}`);
  });

  it.each([
    ['', /^InvalidArgument: missing id$/],
    ['?parent=', /^InvalidArgument: missing id$/],
    ['?id=../../etc&parent=', /^InvalidArgument: id "\.\.\/\.\.\/etc": not a valid layer id$/],
    ['?id=a+b', /^InvalidArgument: id "a\+b": not a valid layer id$/],
    [`?id=${ID}&parent=a/b`, /^InvalidArgument: Parent "a\/b": not a valid layer id$/],
  ])('answers Err for query "%s" and still reads the whole body', async (query, err) => {
    const big = Buffer.alloc(1 << 20, 7);
    const r = await post(`/GraphDriver.ApplyDiff${query}`, Readable.from([big, big]));
    expect((r.json as { Err: string }).Err).toMatch(err);
    expect((await call('Exists', { ID })).json).toEqual({ Exists: true }); // same connection still usable
  });

  it('answers NotFound for an unknown layer', async () => {
    const r = await post(`/GraphDriver.ApplyDiff?id=${ID2}&parent=`, Readable.from([Buffer.alloc(100_000)]));
    expect(r.json).toEqual({ Err: `NotFound: layer ${ID2}: no such layer` });
  });

  it('a store failing mid-body (destroying its stream) still gets its Err back to dockerd', async () => {
    const store = stores[0]!;
    store.applyDiff = async (id: string, _parent: string, tar: Readable): Promise<number> => {
      for await (const _chunk of tar) {
        tar.destroy(); // what stream.pipeline does to its source on a failure
        throw invalidArgument(`layer ${id}: hostile tar entry "../x"`);
      }
      return 0;
    };
    const big = Buffer.alloc(1 << 20, 9);
    const r = await post(`/GraphDriver.ApplyDiff?id=${ID}&parent=`, Readable.from([big, big, big, big]));
    expect(r.json).toEqual({ Err: `InvalidArgument: layer ${ID}: hostile tar entry "../x"` });
    expect((await call('Exists', { ID })).json).toEqual({ Exists: true });
  });

  it('streams the request body to the store as it arrives (never buffers it)', async () => {
    const store = stores[0]!;
    const chunk = Buffer.alloc(64 * 1024, 1);
    const chunks = 512; // 32 MiB after the first chunk
    async function* body(): AsyncGenerator<Buffer> {
      yield chunk;
      // Held until the store has seen bytes: a buffering server would never call the store.
      await withTimeout(store.firstApplyBytes.promise, 10_000, 'store received no bytes before the body ended');
      for (let i = 0; i < chunks; i++) yield chunk;
    }
    const r = await post(`/GraphDriver.ApplyDiff?id=${ID}&parent=`, Readable.from(body()));
    const total = chunk.length * (chunks + 1);
    expect(r.json).toEqual({ Size: total });
    expect(store.applied).toBe(total);
  });
});

describe('Diff', () => {
  beforeEach(async () => {
    await start();
    await init();
    await call('Create', { ID, Parent: '' });
  });

  it('replies with the raw tar bytes, HTTP 200', async () => {
    await post(`/GraphDriver.ApplyDiff?id=${ID}&parent=`, Readable.from([Buffer.from('layer-tar')]));
    const r = await call('Diff', { ID, Parent: '' });
    expect(r.status).toBe(200);
    expect(r.text).toBe('layer-tar');
    expect(stores[0]!.calls.at(-1)).toBe(`diff ${ID} `);
  });

  it('streams the tar: the client gets the first bytes before the store produced the rest', async () => {
    const clientGotFirst = deferred();
    const part = Buffer.alloc(256 * 1024, 2);
    stores[0]!.diffStream = () =>
      Readable.from(
        (async function* () {
          yield part;
          await withTimeout(clientGotFirst.promise, 10_000, 'client saw no bytes while the diff was incomplete');
          for (let i = 0; i < 64; i++) yield part;
        })(),
      );
    const res = await client!.request({
      method: 'POST',
      path: '/GraphDriver.Diff',
      headers: { accept: MIME },
      body: JSON.stringify({ ID, Parent: '' }) + '\n',
    });
    expect(res.statusCode).toBe(200);
    let received = 0;
    for await (const c of res.body as AsyncIterable<Buffer>) {
      received += c.length;
      clientGotFirst.resolve();
    }
    expect(received).toBe(part.length * 65);
  });

  it('a failure before the first byte is a non-200 reply with Err (dockerd ignores Err on 200 here)', async () => {
    const r = await call('Diff', { ID: ID2, Parent: '' });
    expect(r.status).toBe(500);
    expect(r.contentType).toBe(MIME);
    expect(r.json).toEqual({ Err: `NotFound: layer ${ID2}: no such layer` });
  });

  it('a failure mid-stream cuts the connection instead of ending the tar cleanly', async () => {
    stores[0]!.diffStream = () =>
      Readable.from(
        (async function* () {
          yield Buffer.alloc(1024, 3);
          await new Promise((r) => setTimeout(r, 50));
          throw new Error('disk on fire');
        })(),
      );
    const res = await client!.request({
      method: 'POST',
      path: '/GraphDriver.Diff',
      headers: { accept: MIME },
      body: JSON.stringify({ ID, Parent: '' }) + '\n',
    });
    expect(res.statusCode).toBe(200);
    await expect(res.body.arrayBuffer()).rejects.toThrow();
    // The daemon is still fine on a new connection.
    await client!.close();
    client = new Client('http://localhost', { socketPath: socket });
    expect((await call('Exists', { ID })).json).toEqual({ Exists: true });
  });
});

describe('logging', () => {
  it('logs one line per request: debug on success, warn with the Err on a client error', async () => {
    const lines: Array<Record<string, unknown>> = [];
    const logger = pino({ level: 'debug' }, { write: (s: string) => void lines.push(JSON.parse(s)) });
    server = await startGraphDriverServer({ socket, logger, openStore: opener });
    client = new Client('http://localhost', { socketPath: socket });
    await init();
    await call('Create', { ID, Parent: '' });
    await call('Get', { ID: ID2 });
    const requests = lines.filter((l) => l.msg === 'request' || l.msg === 'request failed');
    expect(requests.map((l) => [l.level, l.method, l.id])).toEqual([
      [20, 'GraphDriver.Init', undefined],
      [20, 'GraphDriver.Create', ID],
      [40, 'GraphDriver.Get', ID2],
    ]);
    expect(requests[2]!.err).toBe(`NotFound: layer ${ID2}: no such layer`);
    expect(requests.every((l) => typeof l.durationMs === 'number')).toBe(true);
  });

  it('logs an unexpected exception at error with its stack', async () => {
    const lines: Array<Record<string, unknown>> = [];
    const logger = pino({ level: 'debug' }, { write: (s: string) => void lines.push(JSON.parse(s)) });
    server = await startGraphDriverServer({ socket, logger, openStore: opener });
    client = new Client('http://localhost', { socketPath: socket });
    await init();
    await call('Create', { ID: 'explodes', Parent: '' });
    await call('Get', { ID: 'explodes' });
    const failed = lines.find((l) => l.msg === 'request failed')!;
    expect(failed.level).toBe(50);
    expect(failed.err).toBe('Internal: boom: something unexpected');
    expect(String(failed.stack)).toContain('FakeStore.get');
  });
});

describe('server lifecycle', () => {
  it('creates the socket directory and removes the socket on close', async () => {
    await start();
    expect(existsSync(socket)).toBe(true);
    await client!.close();
    client = undefined;
    await server!.close();
    await server!.close(); // idempotent
    server = undefined;
    expect(existsSync(socket)).toBe(false);
  });

  it('finishes an in-flight request on close, then stops', async () => {
    await start();
    await init();
    await call('Create', { ID, Parent: '' });
    const gate = deferred();
    stores[0]!.getGate = gate.promise;
    const pending = call('Get', { ID });
    await new Promise((r) => setTimeout(r, 50));
    const closing = server!.close();
    setTimeout(() => gate.resolve(), 100);
    const r = await pending;
    expect(r.json).toEqual({ Dir: path.join(stores[0]!.root, 'layers', ID, 'merged') });
    await closing;
    server = undefined;
    expect(existsSync(socket)).toBe(false);
    expect(stores[0]!.cleanups).toBe(0); // a shutdown never unmounts
    expect(stores[0]!.closed).toBe(true);
  });

  it('cuts a stuck request after the shutdown timeout', async () => {
    await start({ shutdownTimeoutMs: 100 });
    await init();
    await call('Create', { ID, Parent: '' });
    stores[0]!.getGate = new Promise(() => undefined);
    const pending = call('Get', { ID }).then(
      () => 'answered',
      () => 'cut',
    );
    await new Promise((r) => setTimeout(r, 50));
    await withTimeout(server!.close(), 5000, 'close() did not honour its timeout');
    server = undefined;
    expect(await pending).toBe('cut');
  });

  it('replaces a stale socket file left by a killed daemon', async () => {
    const { mkdirSync } = await import('node:fs');
    mkdirSync(path.dirname(socket), { recursive: true });
    const r = spawnSync(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(socket)}, () => process.kill(process.pid, 'SIGKILL'))`,
    ]);
    expect(r.signal).toBe('SIGKILL');
    expect(existsSync(socket)).toBe(true);
    await start();
    expect((await post('/Plugin.Activate', 'null')).json).toEqual({ Implements: ['GraphDriver'] });
  });

  it('refuses to start when something is listening on the socket', async () => {
    const { mkdirSync } = await import('node:fs');
    mkdirSync(path.dirname(socket), { recursive: true });
    const other = net.createServer((c) => c.end());
    await new Promise<void>((r) => other.listen(socket, r));
    try {
      await expect(startGraphDriverServer({ socket, logger: silentLogger(), openStore: opener })).rejects.toThrow(
        `socket ${socket}: another process is listening on it`,
      );
    } finally {
      await new Promise((r) => other.close(r));
    }
  });
});
