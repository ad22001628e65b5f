/**
 * A corpus of hostile graph-driver RPCs, sent as raw bytes to the real
 * `gear daemon` process over its unix socket (real store; needs root and
 * dist/). One `it` per case (CASES below; the lead counts them): each must
 * end in a clear RPC error — an HTTP reply whose JSON body is
 * `{"Err": "<Class>: <what and why>"}` — and the daemon must keep serving
 * (checked after every case), with nothing created outside its root.
 *
 * The daemon runs with --body-idle-timeout 1s, so the bodies that never end
 * are answered within seconds.
 */
import fs from 'node:fs/promises';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import tarStream from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mountsUnder, unmountAllUnder } from '../../src/core/sys/mounts.js';
import { post, rawRequest, startGearDaemon, type GearDaemon, type RawReply } from '../helpers/gear-daemon.js';

const BASE = 'b'.repeat(64);
/** A layer created empty before the corpus runs (for ApplyDiff cases that must not touch it). */
const EMPTY = 'e'.repeat(64);

let dir: string;
let daemon: GearDaemon;

type Send = Buffer | string | ((c: net.Socket) => void);
interface Case {
  name: string;
  send: Send | (() => Promise<Send>);
  /** HTTP status of the reply (default 200: the protocol's error convention). */
  status?: number;
  /** What `Err` must match (its class prefix included). */
  err: RegExp;
}

const json = (method: string, body: string | Buffer, headers: string[] = []) => post(`/GraphDriver.${method}`, body, headers);
const obj = (method: string, value: unknown) => json(method, JSON.stringify(value));
/** A chunked request that sends `first` and then nothing, forever (the connection stays open). */
const chunkedStall = (pathAndQuery: string, first: Buffer | string) => (c: net.Socket) => {
  const b = Buffer.isBuffer(first) ? first : Buffer.from(first);
  c.write(`POST ${pathAndQuery} HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n\r\n${b.length.toString(16)}\r\n`);
  c.write(b);
  c.write('\r\n');
};
const raw = (text: string) => Buffer.from(text, 'latin1');

async function tarWith(entries: Array<{ name: string; type?: 'file' | 'symlink'; linkname?: string; body?: string }>): Promise<Buffer> {
  const pack = tarStream.pack();
  for (const e of entries) {
    if (e.type === 'symlink') pack.entry({ name: e.name, type: 'symlink', linkname: e.linkname! });
    else pack.entry({ name: e.name, mode: 0o644 }, e.body ?? 'x');
  }
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as unknown as AsyncIterable<Buffer>) chunks.push(c);
  return Buffer.concat(chunks);
}

const INVALID_ID = /^InvalidArgument: .*not a valid layer id/;
const MALFORMED = /^InvalidArgument: malformed JSON body/;

const CASES: Case[] = [
  // ---- malformed JSON ----
  { name: 'truncated JSON object', send: json('Create', '{"ID": "abc"'), err: MALFORMED },
  { name: 'a lone brace', send: json('Create', '{'), err: MALFORMED },
  { name: 'not JSON at all', send: json('Create', 'hello there'), err: MALFORMED },
  { name: 'JSON followed by garbage', send: json('Create', '{"ID":"x1"} trailing'), err: MALFORMED },
  { name: 'two JSON objects', send: json('Remove', '{"ID":"x1"}{"ID":"x2"}'), err: MALFORMED },
  { name: 'single-quoted JSON', send: json('Get', "{'ID':'x1'}"), err: MALFORMED },
  { name: 'invalid UTF-8 bytes', send: json('Create', Buffer.from([0x7b, 0xff, 0xfe, 0x7d])), err: MALFORMED },
  { name: 'a JSON array body', send: json('Create', '[{"ID":"x1"}]'), err: /^InvalidArgument: request body must be a JSON object, got array/ },
  { name: 'a JSON string body', send: json('Remove', '"x1"'), err: /^InvalidArgument: request body must be a JSON object, got string/ },
  { name: 'a JSON number body', send: json('Get', '42'), err: /^InvalidArgument: request body must be a JSON object, got number/ },
  { name: 'deeply nested value', send: json('Create', `{"ID":${'['.repeat(50_000)}${']'.repeat(50_000)}}`), err: /^InvalidArgument: (ID must be a string|malformed JSON body)/ },
  // ---- wrong types ----
  { name: 'ID is a number', send: obj('Create', { ID: 5 }), err: /^InvalidArgument: ID must be a string/ },
  { name: 'ID is an object', send: obj('Remove', { ID: { a: 1 } }), err: /^InvalidArgument: ID must be a string/ },
  { name: 'ID is true', send: obj('Get', { ID: true }), err: /^InvalidArgument: ID must be a string/ },
  { name: 'Parent is a number', send: obj('Create', { ID: 'p1', Parent: 7 }), err: /^InvalidArgument: Parent must be a string/ },
  { name: 'MountLabel is an array', send: obj('Get', { ID: BASE, MountLabel: ['x'] }), err: /^InvalidArgument: MountLabel must be a string/ },
  { name: 'StorageOpt is an array', send: obj('Create', { ID: 's1', StorageOpt: ['size=1G'] }), err: /^InvalidArgument: StorageOpt must be an object/ },
  { name: 'a StorageOpt value is a number', send: obj('Create', { ID: 's1', StorageOpt: { size: 10 } }), err: /^InvalidArgument: StorageOpt "size" must be a string/ },
  { name: 'an unsupported StorageOpt', send: obj('CreateReadWrite', { ID: 's1', StorageOpt: { size: '10G' } }), err: /^InvalidArgument: storage option "size" is not supported/ },
  { name: 'Init Opts is a string', send: obj('Init', { Home: '/x', Opts: 'a=b' }), err: /^InvalidArgument: Opts must be an array of strings/ },
  { name: 'Init Opts holds numbers', send: obj('Init', { Home: '/x', Opts: [1, 2] }), err: /^InvalidArgument: Opts must be an array of strings/ },
  { name: 'Init UIDMaps is an object', send: obj('Init', { UIDMaps: { container_id: 0 } }), err: /^InvalidArgument: UIDMaps must be an array or null/ },
  { name: 'Init GIDMaps entry has a string host_id', send: obj('Init', { GIDMaps: [{ container_id: 0, host_id: '1', size: 1 }] }), err: /^InvalidArgument: GIDMaps\[0\]\.host_id must be an integer/ },
  { name: 'Init Home is a number', send: obj('Init', { Home: 3 }), err: /^InvalidArgument: Home must be a string/ },
  { name: 'Init with an unknown option', send: obj('Init', { Opts: ['overlay2.size=1G'] }), err: /^InvalidArgument: storage option "overlay2.size=1G": not supported/ },
  // ---- missing fields ----
  { name: 'Create without ID', send: obj('Create', {}), err: /^InvalidArgument: missing ID/ },
  { name: 'Remove with an empty body', send: json('Remove', ''), err: /^InvalidArgument: missing ID/ },
  { name: 'Get with only a Parent', send: obj('Get', { Parent: BASE }), err: /^InvalidArgument: missing ID/ },
  { name: 'Changes with a null body', send: json('Changes', 'null'), err: /^InvalidArgument: missing ID/ },
  { name: 'DiffSize with an empty ID', send: obj('DiffSize', { ID: '' }), err: /^InvalidArgument: missing ID/ },
  { name: 'Diff without ID (non-200 reply)', send: obj('Diff', {}), status: 500, err: /^InvalidArgument: missing ID/ },
  { name: 'ApplyDiff without a query', send: post('/GraphDriver.ApplyDiff', 'x'), err: /^InvalidArgument: missing id/ },
  { name: 'ApplyDiff with only a parent', send: post(`/GraphDriver.ApplyDiff?parent=${BASE}`, 'x'), err: /^InvalidArgument: missing id/ },
  // ---- sizes beyond a bound ----
  { name: 'a JSON body over 1 MiB', send: json('Create', `{"ID":"${'a'.repeat(2 << 20)}"}`), err: /^InvalidArgument: request body of \d+ bytes is larger than 1048576 bytes/ },
  { name: 'an ID of 100,000 characters', send: obj('Create', { ID: 'a'.repeat(100_000) }), err: INVALID_ID },
  { name: 'an ID of 129 characters', send: obj('Create', { ID: 'a'.repeat(129) }), err: INVALID_ID },
  { name: 'headers over the size limit', send: post('/GraphDriver.Status', '{}', [`X-Junk: ${'j'.repeat(64 * 1024)}`]), status: 431, err: /^InvalidArgument: malformed HTTP request: .*HPE_HEADER_OVERFLOW/ },
  // ---- hostile ids ----
  { name: 'ID ../etc', send: obj('Create', { ID: '../etc' }), err: INVALID_ID },
  { name: 'ID a/../../b', send: obj('Create', { ID: 'a/../../b' }), err: INVALID_ID },
  { name: 'ID ..', send: obj('Remove', { ID: '..' }), err: INVALID_ID },
  { name: 'ID with ".." inside', send: obj('Create', { ID: 'a..b' }), err: INVALID_ID },
  { name: 'ID with a NUL byte', send: obj('Create', { ID: 'a\u0000b' }), err: INVALID_ID },
  { name: 'ID starting with a dot', send: obj('Create', { ID: '.trash-x' }), err: INVALID_ID },
  { name: 'ID with a slash', send: obj('Get', { ID: 'a/b' }), err: INVALID_ID },
  { name: 'ID with a newline', send: obj('Create', { ID: 'a\nb' }), err: INVALID_ID },
  { name: 'ID with non-ASCII letters', send: obj('Create', { ID: 'caf\u00e9' }), err: INVALID_ID },
  { name: 'absolute path as ID', send: obj('Create', { ID: '/etc/passwd' }), err: INVALID_ID },
  { name: 'Parent ../x', send: obj('Create', { ID: 'ok1', Parent: '../x' }), err: /^InvalidArgument: Parent .*not a valid layer id/ },
  { name: 'ApplyDiff id percent-encoded ../', send: post('/GraphDriver.ApplyDiff?id=..%2F..%2Fetc&parent=', 'x'), err: /^InvalidArgument: id .*not a valid layer id/ },
  { name: 'ApplyDiff id with %00', send: post('/GraphDriver.ApplyDiff?id=a%00b&parent=', 'x'), err: /^InvalidArgument: id .*not a valid layer id/ },
  { name: 'ApplyDiff parent with a slash', send: post(`/GraphDriver.ApplyDiff?id=${EMPTY}&parent=a/b`, 'x'), err: /^InvalidArgument: Parent .*not a valid layer id/ },
  // ---- unknown methods ----
  { name: 'unknown GraphDriver method', send: obj('Nope', { ID: BASE }), status: 404, err: /^Unimplemented: POST \/GraphDriver\.Nope: no such plugin method/ },
  { name: 'unknown plugin interface', send: post('/VolumeDriver.Create', '{}'), status: 404, err: /^Unimplemented: / },
  { name: 'GET instead of POST', send: raw(`GET /GraphDriver.Status HTTP/1.1\r\nHost: plugin\r\nConnection: close\r\n\r\n`), status: 404, err: /^Unimplemented: GET \/GraphDriver\.Status/ },
  { name: 'POST to /', send: post('/', '{}'), status: 404, err: /^Unimplemented: / },
  { name: 'method name with a path traversal', send: post('/GraphDriver.Create/../../Plugin.Activate', '{}'), status: 404, err: /^Unimplemented: / },
  // ---- parents: missing, itself ----
  { name: 'Create with a missing parent', send: obj('Create', { ID: 'orphan1', Parent: 'f'.repeat(64) }), err: /^NotFound: parent layer f+ of orphan1: no such layer/ },
  { name: 'Create with itself as parent', send: obj('Create', { ID: 'selfish1', Parent: 'selfish1' }), err: /^NotFound: parent layer selfish1 of selfish1: no such layer/ },
  { name: 'ApplyDiff with itself as parent', send: async () => post(`/GraphDriver.ApplyDiff?id=${EMPTY}&parent=${EMPTY}`, await tarWith([{ name: 'a' }])), err: /^InvalidArgument: layer e+: applyDiff with parent "e+", but its parent is ""/ },
  { name: 'ApplyDiff to a missing layer', send: async () => post(`/GraphDriver.ApplyDiff?id=${'d'.repeat(64)}&parent=`, await tarWith([{ name: 'a' }])), err: /^NotFound: / },
  { name: 'Diff against a missing parent (non-200 reply)', send: obj('Diff', { ID: BASE, Parent: 'f'.repeat(64) }), status: 500, err: /^NotFound: / },
  { name: 'Changes of a missing layer', send: obj('Changes', { ID: 'c'.repeat(64) }), err: /^NotFound: / },
  // ---- wrong Content-Type / encodings ----
  { name: 'form-encoded body', send: json('Create', 'ID=abc', ['Content-Type: application/x-www-form-urlencoded']), err: MALFORMED },
  { name: 'multipart body', send: json('Create', '--x\r\nContent-Disposition: form-data; name="ID"\r\n\r\nabc\r\n--x--', ['Content-Type: multipart/form-data; boundary=x']), err: MALFORMED },
  { name: 'gzip Content-Encoding (not decoded)', send: json('Create', gzipSync('{"ID":"gz1"}'), ['Content-Encoding: gzip']), err: MALFORMED },
  { name: 'JSON Content-Type, invalid id', send: json('Create', '{"ID":"../x"}', ['Content-Type: application/json']), err: INVALID_ID },
  // ---- bodies: framing, never ending, not a tar ----
  { name: 'chunked JSON body that never ends', send: chunkedStall('/GraphDriver.Create', '{"ID":'), err: /^DeadlineExceeded: the JSON request body: the client sent nothing for 1 s .*--body-idle-timeout/ },
  { name: 'chunked Plugin.Activate body that never ends', send: chunkedStall('/Plugin.Activate', 'nu'), err: /^DeadlineExceeded: the JSON request body: the client sent nothing for 1 s/ },
  { name: 'Plugin.Activate body over 1 MiB', send: post('/Plugin.Activate', Buffer.alloc(2 << 20, 0x20)), err: /^InvalidArgument: request body of \d+ bytes is larger than 1048576 bytes/ },
  { name: 'chunked ApplyDiff body that never ends', send: chunkedStall(`/GraphDriver.ApplyDiff?id=${EMPTY}&parent=`, Buffer.alloc(1024)), err: /^DeadlineExceeded: .*the layer tar: the client sent nothing for 1 s .*--body-idle-timeout/ },
  { name: 'Content-Length larger than the body sent', send: raw(`POST /GraphDriver.Get HTTP/1.1\r\nHost: plugin\r\nContent-Length: 1000\r\n\r\n{"ID":`), err: /^DeadlineExceeded: the JSON request body: the client sent nothing/ },
  { name: 'a bad chunk size', send: raw(`POST /GraphDriver.Create HTTP/1.1\r\nHost: plugin\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n`), status: 400, err: /^InvalidArgument: malformed HTTP request: / },
  { name: 'both Content-Length and chunked', send: raw(`POST /GraphDriver.Create HTTP/1.1\r\nHost: plugin\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n`), status: 400, err: /^InvalidArgument: malformed HTTP request: / },
  { name: 'not HTTP at all', send: raw('\u0016\u0003\u0001\u0000\u00a5\u0001\u0000\u0000\u00a1\u0003\u0003garbage\r\n\r\n'), status: 400, err: /^InvalidArgument: malformed HTTP request: / },
  { name: 'ApplyDiff of bytes that are no tar', send: post(`/GraphDriver.ApplyDiff?id=${EMPTY}&parent=`, Buffer.alloc(4096, 0x5a)), err: /^InvalidArgument: .*(corrupt|tar)/ },
  { name: 'ApplyDiff of a tar escaping with ../', send: async () => post(`/GraphDriver.ApplyDiff?id=${EMPTY}&parent=`, await tarWith([{ name: '../../escaped', body: 'pwned' }])), err: /^InvalidArgument: / },
  { name: 'ApplyDiff of a tar writing through a symlink', send: async () => post(`/GraphDriver.ApplyDiff?id=${EMPTY}&parent=`, await tarWith([{ name: 'link', type: 'symlink', linkname: '/tmp' }, { name: 'link/escaped2', body: 'pwned' }])), err: /^InvalidArgument: / },
  { name: 'a second ApplyDiff on an applied layer', send: async () => post(`/GraphDriver.ApplyDiff?id=${BASE}&parent=`, await tarWith([{ name: 'again' }])), err: /^FailedPrecondition: layer b+ already has content/ },
];

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-hostile-'));
  daemon = await startGearDaemon({ dir, args: ['--body-idle-timeout', '1s'] });
  const ok = async (r: Promise<RawReply>) => JSON.parse((await r).body.toString()) as unknown;
  expect(await ok(rawRequest(daemon.socket, obj('Create', { ID: BASE })))).toEqual({});
  expect(await ok(rawRequest(daemon.socket, post(`/GraphDriver.ApplyDiff?id=${BASE}&parent=`, await tarWith([{ name: 'base', body: 'base' }]))))).toEqual({ Size: 4 });
  expect(await ok(rawRequest(daemon.socket, obj('Create', { ID: EMPTY })))).toEqual({});
});

afterAll(async () => {
  await daemon?.stop();
  unmountAllUnder(dir);
  await fs.rm(dir, { recursive: true, force: true });
});

describe('hostile graph-driver RPCs against the gear daemon', () => {
  it('has at least 40 distinct cases', () => {
    expect(new Set(CASES.map((c) => c.name)).size).toBe(CASES.length);
    expect(CASES.length).toBeGreaterThanOrEqual(40);
  });

  it.each(CASES.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const send = typeof c.send === 'function' && c.send.length === 0 ? await (c.send as () => Promise<Send>)() : (c.send as Send);
    const r = await rawRequest(daemon.socket, send, 15_000);
    if (r.cut) throw new Error(`no HTTP reply (got ${JSON.stringify(r.body.toString('latin1').slice(0, 200))})\n--- daemon log ---\n${daemon.log().slice(-4000)}`);
    expect(r.status).toBe(c.status ?? 200);
    expect(r.headers['content-type']).toBe('application/vnd.docker.plugins.v1.2+json');
    const body = JSON.parse(r.body.toString()) as Record<string, unknown>;
    expect(Object.keys(body)).toEqual(['Err']);
    expect(body.Err).toMatch(c.err);
    // Still serving, and the layers the corpus must not touch are as they were.
    expect(daemon.alive(), daemon.log()).toBe(true);
    const exists = await rawRequest(daemon.socket, obj('Exists', { ID: BASE }));
    expect(JSON.parse(exists.body.toString())).toEqual({ Exists: true });
  });

  it('afterwards: only the two layers exist, untouched, and nothing escaped the root', async () => {
    expect((await fs.readdir(path.join(daemon.root, 'layers'))).sort()).toEqual([BASE, EMPTY]);
    expect(await fs.readdir(path.join(daemon.root, 'layers', EMPTY, 'diff'))).toEqual([]);
    expect(await fs.readdir(path.join(daemon.root, 'layers', EMPTY))).not.toContain('applying');
    expect(await fs.readdir(path.join(daemon.root, 'layers', BASE, 'diff'))).toEqual(['base']);
    expect(await fs.readdir(dir)).toEqual(expect.not.arrayContaining(['escaped', 'etc']));
    await expect(fs.stat('/tmp/escaped2')).rejects.toThrow();
    expect(mountsUnder(daemon.root)).toEqual([]);
    expect(daemon.log()).not.toMatch(/uncaught|unhandled/i);
  });
});
