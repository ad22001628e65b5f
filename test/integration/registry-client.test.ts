/**
 * The registry client against a real distribution registry (Debian's
 * docker-registry 2.8) on 127.0.0.1, with a fault-injecting proxy in front
 * for retries and corruption. Network only to 127.0.0.1.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { text } from 'node:stream/consumers';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GearError } from '../../src/core/errors.js';
import { fileBlobSource, RegistryClient, type RegistryClientOptions } from '../../src/core/registry/client.js';
import { DigestMismatchError, sha256Digest } from '../../src/core/registry/digest.js';
import { MediaType } from '../../src/core/registry/media-types.js';
import { GEAR_CLI } from '../helpers/dockerd.js';
import { writeOciImage } from '../helpers/oci-images.js';
import { run } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const FAST_RETRY = { maxAttempts: 4, minDelayMs: 20, maxDelayMs: 2000, maxTotalMs: 10_000 };

function blob(n: number): { bytes: Buffer; digest: string } {
  const bytes = randomBytes(n);
  return { bytes, digest: sha256Digest(bytes) };
}

async function gearErrorOf(p: Promise<unknown>): Promise<GearError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof GearError) return err;
    throw new Error(`expected a GearError, got ${String(err)}`, { cause: err });
  }
  throw new Error('expected a rejection');
}

/** Push config + one layer + manifest for a tiny image; returns the manifest digest. */
async function pushImage(client: RegistryClient, repo: string, tag: string, arch = 'amd64') {
  const layer = blob(1000);
  const config = Buffer.from(JSON.stringify({ architecture: arch, os: 'linux', rootfs: { type: 'layers', diff_ids: [layer.digest] } }));
  const configDigest = sha256Digest(config);
  await client.pushBlob(repo, layer.digest, layer.bytes);
  await client.pushBlob(repo, configDigest, config);
  const manifest = {
    schemaVersion: 2,
    mediaType: MediaType.OciManifest,
    config: { mediaType: MediaType.OciConfig, digest: configDigest, size: config.length },
    layers: [{ mediaType: MediaType.OciLayer, digest: layer.digest, size: layer.bytes.length }],
  };
  const bytes = Buffer.from(JSON.stringify(manifest));
  const { digest } = await client.putManifest(`${repo}:${tag}`, bytes);
  return { digest, size: bytes.length, layer };
}

describe('registry client against docker-registry', () => {
  let reg: TestRegistry;
  let client: RegistryClient;
  let tmp: string;

  beforeAll(async () => {
    reg = await startRegistry();
    client = new RegistryClient({ retry: FAST_RETRY });
    tmp = await mkdtemp(join(tmpdir(), 'gear-regclient-'));
  });
  afterAll(async () => {
    await client?.close();
    await reg?.stop();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('uploads a blob monolithically, then HEAD, GET, Range and verified download return it', async () => {
    const repo = `${reg.host}/gear/mono`;
    const b = blob(300_000);
    expect(await client.statBlob(repo, b.digest)).toBeUndefined();
    expect(await client.pushBlob(repo, b.digest, b.bytes)).toEqual({ digest: b.digest, size: b.bytes.length, status: 'uploaded' });
    expect(await client.statBlob(repo, b.digest)).toEqual({ digest: b.digest, size: b.bytes.length });
    expect((await client.fetchBlob(repo, b.digest)).equals(b.bytes)).toBe(true);

    const r = await client.openBlob(repo, b.digest, { range: { start: 1000, end: 1999 } });
    expect(r.length).toBe(1000);
    expect(r.range).toEqual({ start: 1000, end: 1999 });
    expect(r.size).toBe(b.bytes.length);
    const chunks: Buffer[] = [];
    for await (const c of r.stream) chunks.push(c as Buffer);
    expect(Buffer.concat(chunks).equals(b.bytes.subarray(1000, 2000))).toBe(true);

    const tail = await client.openBlob(repo, b.digest, { range: { start: b.bytes.length - 10 } });
    const tailChunks: Buffer[] = [];
    for await (const c of tail.stream) tailChunks.push(c as Buffer);
    expect(Buffer.concat(tailChunks).equals(b.bytes.subarray(b.bytes.length - 10))).toBe(true);

    const dest = join(tmp, 'mono.blob');
    expect(await client.fetchBlobVerified(repo, b.digest, dest, { expectedSize: b.bytes.length })).toEqual({ size: b.bytes.length });
    expect((await readFile(dest)).equals(b.bytes)).toBe(true);

    expect((await client.pushBlob(repo, b.digest, b.bytes)).status).toBe('exists');
  });

  it('uploads a blob in PATCH chunks from a re-openable file source', async () => {
    const repo = `${reg.host}/gear/chunked`;
    const b = blob(250_000);
    const src = join(tmp, 'chunked.src');
    await writeFile(src, b.bytes);
    const res = await client.pushBlob(repo, b.digest, fileBlobSource(src, b.bytes.length), { chunkSize: 64 * 1024 });
    expect(res.status).toBe('uploaded');
    expect((await client.fetchBlob(repo, b.digest)).equals(b.bytes)).toBe(true);
  });

  it('an upload whose bytes do not match the digest is rejected as InvalidArgument', async () => {
    const repo = `${reg.host}/gear/badupload`;
    const b = blob(100);
    const err = await gearErrorOf(client.pushBlob(repo, sha256Digest('something else'), b.bytes));
    expect(err.class).toBe('InvalidArgument');
  });

  it('mounts a blob across repositories, and falls back to an upload when the source lacks it', async () => {
    const b = blob(5000);
    await client.pushBlob(`${reg.host}/gear/src`, b.digest, b.bytes);
    const mounted = await client.pushBlob(`${reg.host}/gear/dst`, b.digest, b.bytes, { mountFrom: [`${reg.host}/gear/src`] });
    expect(mounted.status).toBe('mounted');
    expect((await client.fetchBlob(`${reg.host}/gear/dst`, b.digest)).equals(b.bytes)).toBe(true);

    const c = blob(5000);
    const fallback = await client.pushBlob(`${reg.host}/gear/dst2`, c.digest, c.bytes, { mountFrom: [`${reg.host}/gear/empty`] });
    expect(fallback.status).toBe('uploaded');
    expect((await client.fetchBlob(`${reg.host}/gear/dst2`, c.digest)).equals(c.bytes)).toBe(true);
    expect(await client.mountBlob(`${reg.host}/gear/dst3`, c.digest, `${reg.host}/gear/empty`)).toBe(false);
    expect(await client.mountBlob(`${reg.host}/gear/dst3`, c.digest, `${reg.host}/gear/dst2`)).toBe(true);
  });

  it('puts and gets manifests by tag and by digest, verifying digests', async () => {
    const repo = `${reg.host}/gear/app`;
    const { digest, size } = await pushImage(client, repo, 'v1');
    const byTag = await client.getManifest(`${repo}:v1`);
    expect(byTag.digest).toBe(digest);
    expect(byTag.mediaType).toBe(MediaType.OciManifest);
    const byDigest = await client.getManifest(`${repo}@${digest}`);
    expect(byDigest.bytes.equals(byTag.bytes)).toBe(true);
    expect(await client.headManifest(`${repo}:v1`)).toMatchObject({ digest, size });

    // PUT by digest, then the same content under a second tag.
    const again = await client.putManifest(`${repo}@${digest}`, byTag.bytes);
    expect(again.digest).toBe(digest);
    await client.putManifest(`${repo}:v1-copy`, byTag.bytes);
    expect((await client.listTags(repo)).sort()).toEqual(['v1', 'v1-copy']);

    const resolved = await client.resolveImage(`${repo}:v1`);
    expect(resolved.digest).toBe(digest);
    expect(resolved.index).toBeUndefined();
  });

  it('selects the platform manifest from an OCI index', async () => {
    const repo = `${reg.host}/gear/multi`;
    const amd = await pushImage(client, repo, 'amd64', 'amd64');
    const arm = await pushImage(client, repo, 'arm64', 'arm64');
    const index = {
      schemaVersion: 2,
      mediaType: MediaType.OciIndex,
      manifests: [
        { mediaType: MediaType.OciManifest, digest: amd.digest, size: amd.size, platform: { os: 'linux', architecture: 'amd64' } },
        { mediaType: MediaType.OciManifest, digest: arm.digest, size: arm.size, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } },
      ],
    };
    const { digest: indexDigest } = await client.putManifest(`${repo}:multi`, index);
    const a = await client.resolveImage(`${repo}:multi`, { platform: { os: 'linux', architecture: 'amd64' } });
    expect(a.digest).toBe(amd.digest);
    expect(a.index?.digest).toBe(indexDigest);
    const b = await client.resolveImage(`${repo}:multi`, { platform: { os: 'linux', architecture: 'arm64' } });
    expect(b.digest).toBe(arm.digest);
    const err = await gearErrorOf(client.resolveImage(`${repo}:multi`, { platform: { os: 'linux', architecture: 's390x' } }));
    expect(err.class).toBe('NotFound');
    expect(err.message).toContain('linux/s390x');
  });

  it('maps 404 to NotFound and rejects bad digests before any request', async () => {
    const repo = `${reg.host}/gear/app`;
    expect((await gearErrorOf(client.getManifest(`${repo}:nope`))).class).toBe('NotFound');
    expect((await gearErrorOf(client.getManifest(`${reg.host}/gear/never:x`))).class).toBe('NotFound');
    expect((await gearErrorOf(client.openBlob(repo, sha256Digest('absent')))).class).toBe('NotFound');
    expect(await client.headManifest(`${repo}:nope`)).toBeUndefined();
    expect((await gearErrorOf(client.openBlob(repo, 'sha256:../../etc/passwd'))).class).toBe('InvalidArgument');
    expect((await gearErrorOf(client.statBlob(repo, 'sha256:' + 'A'.repeat(64)))).class).toBe('InvalidArgument');
    expect((await gearErrorOf(client.getManifest(`${reg.host}/Gear/UPPER:x`))).class).toBe('InvalidArgument');
  });
});

describe('registry client with htpasswd auth', () => {
  let reg: TestRegistry;
  let tmp: string;

  beforeAll(async () => {
    reg = await startRegistry({ htpasswd: true });
    tmp = await mkdtemp(join(tmpdir(), 'gear-regauth-'));
  });
  afterAll(async () => {
    await reg?.stop();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  it('without credentials fails with PermissionDenied naming the registry and how to log in', async () => {
    const client = new RegistryClient({ dockerConfigPath: join(tmp, 'absent.json'), retry: FAST_RETRY });
    try {
      const err = await gearErrorOf(client.getManifest(`${reg.host}/gear/app:v1`));
      expect(err.class).toBe('PermissionDenied');
      expect(err.message).toContain(`no credentials for registry ${reg.host}`);
      expect(err.message).toContain(`docker login ${reg.host}`);
    } finally {
      await client.close();
    }
  });

  it('with credentials from a docker config.json pushes and pulls; a wrong password is PermissionDenied', async () => {
    const cfg = join(tmp, 'config.json');
    const auth = Buffer.from(`${reg.credentials!.username}:${reg.credentials!.password}`).toString('base64');
    await writeFile(cfg, JSON.stringify({ auths: { [`http://${reg.host}`]: { auth }, 'other.example:5000': { auth: 'eDp5' } } }));
    const client = new RegistryClient({ dockerConfigPath: cfg, retry: FAST_RETRY });
    try {
      const { digest } = await pushImage(client, `${reg.host}/gear/private`, 'v1');
      expect((await client.getManifest(`${reg.host}/gear/private:v1`)).digest).toBe(digest);
    } finally {
      await client.close();
    }

    const bad = join(tmp, 'bad.json');
    await writeFile(bad, JSON.stringify({ auths: { [reg.host]: { username: 'gear', password: 'wrong' } } }));
    const badClient = new RegistryClient({ dockerConfigPath: bad, retry: FAST_RETRY });
    try {
      const err = await gearErrorOf(badClient.getManifest(`${reg.host}/gear/private:v1`));
      expect(err.class).toBe('PermissionDenied');
      expect(err.message).toContain(reg.host);
    } finally {
      await badClient.close();
    }
  });
  it('a login kept only in a credential helper (credHelpers) works for gear convert, end to end; a failing helper is named', async () => {
    // A helper program of our own, speaking the docker-credential-helpers protocol, on PATH.
    const bin = join(tmp, 'helper-bin');
    await mkdir(bin, { recursive: true });
    const { username, password } = reg.credentials!;
    await writeFile(
      join(bin, 'docker-credential-gear-test'),
      `#!/bin/sh\nread -r server\n[ "$server" = "${reg.host}" ] || { echo "credentials not found in native keychain"; exit 1; }\n` +
        `printf '{"ServerURL":"%s","Username":"${username}","Secret":"${password}"}' "$server"\n`,
      { mode: 0o755 },
    );
    await writeFile(join(bin, 'docker-credential-gear-broken'), '#!/bin/sh\necho "keychain locked" >&2\nexit 1\n', { mode: 0o755 });
    const cfgDir = join(tmp, 'helper-config');
    await mkdir(cfgDir, { recursive: true });
    await writeFile(join(cfgDir, 'config.json'), JSON.stringify({ auths: {}, credHelpers: { [reg.host]: 'gear-test' } }));
    const src = join(tmp, 'helper-src');
    await writeOciImage(src, [[{ path: 'hello.txt', content: 'hello from a helper login\n' }]], { tag: 'v1' });
    const env = { ...process.env, DOCKER_CONFIG: cfgDir, PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}` };
    const ok = await run('node', [GEAR_CLI, 'convert', `oci:${src}:v1`, `${reg.host}/gear/helper:v1`, '--json'], { env, timeoutMs: 120_000 });
    expect(ok.code, ok.stderr).toBe(0);
    // What was pushed is there, readable with the same helper login.
    const client = new RegistryClient({ dockerConfigPath: join(cfgDir, 'config.json'), retry: FAST_RETRY });
    const oldPath = process.env.PATH;
    process.env.PATH = env.PATH;
    try {
      expect((await client.getManifest(`${reg.host}/gear/helper:v1`)).digest).toMatch(/^sha256:/);
    } finally {
      process.env.PATH = oldPath;
      await client.close();
    }

    await writeFile(join(cfgDir, 'config.json'), JSON.stringify({ credsStore: 'gear-broken' }));
    const bad = await run('node', [GEAR_CLI, 'convert', `oci:${src}:v1`, `${reg.host}/gear/helper:v2`], { env, timeoutMs: 120_000 });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain('docker-credential-gear-broken');
    expect(bad.stderr).toContain('keychain locked');
  });

  it('follows a blob redirect to another origin without sending the Authorization header', async () => {
    const cfg = join(tmp, 'redirect-config.json');
    const b = blob(4096);
    const seenAuth: Array<string | undefined> = [];
    const cdn = createServer((req, res) => {
      seenAuth.push(req.headers.authorization);
      res.writeHead(200, { 'content-length': String(b.bytes.length) });
      res.end(b.bytes);
    });
    await new Promise<void>((r) => cdn.listen(0, '127.0.0.1', () => r()));
    const cdnPort = (cdn.address() as { port: number }).port;
    const proxy = await startFaultProxy(reg.url, (req) =>
      req.method === 'GET' && req.url?.includes('/blobs/sha256:')
        ? { kind: 'status', status: 307, headers: { location: `http://127.0.0.1:${cdnPort}/cdn/blob` }, body: '' }
        : undefined,
    );
    // Credentials belong to the host the client talks to (the proxy), never to the redirect target.
    await writeFile(cfg, JSON.stringify({ auths: { [proxy.host]: { username: reg.credentials!.username, password: reg.credentials!.password } } }));
    const client = new RegistryClient({ dockerConfigPath: cfg, retry: FAST_RETRY });
    try {
      await client.pushBlob(`${proxy.host}/gear/redirected`, b.digest, b.bytes);
      const got = await client.fetchBlob(`${proxy.host}/gear/redirected`, b.digest);
      expect(got.equals(b.bytes)).toBe(true);
      expect(seenAuth).toEqual([undefined]);
    } finally {
      await client.close();
      await proxy.stop();
      await new Promise<void>((r) => cdn.close(() => r()));
    }
  });
});

describe('registry client through a fault-injecting proxy', () => {
  let reg: TestRegistry;
  let proxy: FaultProxy;
  let tmp: string;
  const blobA = blob(200_000);
  const REPO = () => `${proxy.host}/gear/faults`;
  const mk = (extra: RegistryClientOptions = {}) => new RegistryClient({ retry: FAST_RETRY, ...extra });

  beforeAll(async () => {
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    tmp = await mkdtemp(join(tmpdir(), 'gear-regfault-'));
    const c = mk();
    await c.pushBlob(REPO(), blobA.digest, blobA.bytes);
    await c.close();
  });
  afterAll(async () => {
    await proxy?.stop();
    await reg?.stop();
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  /** Fail the first `n` requests after now with `action`, forward the rest. */
  function failFirst(n: number, action: Parameters<FaultProxy['setDecider']>[0] extends (...a: never[]) => infer R ? R : never) {
    const base = proxy.count;
    proxy.setDecider((_req, k) => (k - base <= n ? action : undefined));
  }

  it('retries 503 and succeeds', async () => {
    const c = mk();
    try {
      failFirst(2, { kind: 'status', status: 503 });
      const before = proxy.count;
      expect((await c.fetchBlob(REPO(), blobA.digest)).equals(blobA.bytes)).toBe(true);
      expect(proxy.count - before).toBe(3);
    } finally {
      await c.close();
    }
  });

  it('honours Retry-After on 429', async () => {
    const c = mk();
    try {
      failFirst(1, { kind: 'status', status: 429, headers: { 'retry-after': '1' } });
      const t0 = Date.now();
      expect(await c.statBlob(REPO(), blobA.digest)).toEqual({ digest: blobA.digest, size: blobA.bytes.length });
      expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    } finally {
      await c.close();
    }
  });

  it('retries connection resets, including a reset during a streamed download', async () => {
    const c = mk();
    try {
      failFirst(2, { kind: 'reset' });
      expect((await c.fetchBlob(REPO(), blobA.digest)).equals(blobA.bytes)).toBe(true);
      failFirst(1, { kind: 'truncate', bytes: 1000 });
      const dest = join(tmp, 'after-truncate.blob');
      await c.fetchBlobVerified(REPO(), blobA.digest, dest);
      expect((await readFile(dest)).equals(blobA.bytes)).toBe(true);
    } finally {
      await c.close();
    }
  });

  it('re-opens the upload body after a reset during upload', async () => {
    const c = mk();
    try {
      const b = blob(100_000);
      const base = proxy.count;
      let putsFailed = 0;
      proxy.setDecider((req, k) => {
        if (k - base < 20 && (req.method === 'PUT' || req.method === 'PATCH') && putsFailed < 1) {
          putsFailed++;
          return { kind: 'reset' };
        }
        return undefined;
      });
      const res = await c.pushBlob(REPO(), b.digest, b.bytes, { chunkSize: 40_000 });
      expect(res.status).toBe('uploaded');
      expect(putsFailed).toBe(1);
      proxy.setDecider(() => undefined);
      expect((await c.fetchBlob(REPO(), b.digest)).equals(b.bytes)).toBe(true);
    } finally {
      await c.close();
    }
  });

  it('gives up with Unavailable after a bounded number of attempts', async () => {
    const c = mk({ retry: { maxAttempts: 3, minDelayMs: 10, maxDelayMs: 50, maxTotalMs: 5000 } });
    try {
      failFirst(100, { kind: 'status', status: 503 });
      const before = proxy.count;
      const err = await gearErrorOf(c.statBlob(REPO(), blobA.digest));
      expect(err.class).toBe('Unavailable');
      expect(proxy.count - before).toBe(3);
    } finally {
      proxy.setDecider(() => undefined);
      await c.close();
    }
  });

  it('times out a hanging registry with DeadlineExceeded, and honours AbortSignal', async () => {
    const c = mk({ headersTimeoutMs: 300, retry: { maxAttempts: 2, minDelayMs: 10, maxDelayMs: 50, maxTotalMs: 5000 } });
    try {
      proxy.setDecider(() => ({ kind: 'hang' }));
      const t0 = Date.now();
      const err = await gearErrorOf(c.statBlob(REPO(), blobA.digest));
      expect(err.class).toBe('DeadlineExceeded');
      expect(Date.now() - t0).toBeLessThan(5000);

      const ac = new AbortController();
      setTimeout(() => ac.abort(new Error('caller gave up')), 100);
      await expect(c.openBlob(REPO(), blobA.digest, { signal: ac.signal })).rejects.toThrow('caller gave up');
    } finally {
      proxy.setDecider(() => undefined);
      await c.close();
    }
  });

  it('a byte-flipping path makes the verified download fail and leaves no file', async () => {
    const c = mk();
    try {
      proxy.setDecider((req) => (req.method === 'GET' && req.url?.includes('/blobs/') ? { kind: 'flip' } : undefined));
      const dest = join(tmp, 'flipped.blob');
      const err = await gearErrorOf(c.fetchBlobVerified(REPO(), blobA.digest, dest));
      expect(err).toBeInstanceOf(DigestMismatchError);
      expect(existsSync(dest)).toBe(false);
      await expect(c.fetchBlob(REPO(), blobA.digest)).rejects.toBeInstanceOf(DigestMismatchError);

      // an unverified range stream still works (the caller verifies), and its bytes are the wrong ones
      const r = await c.openBlob(REPO(), blobA.digest, { range: { start: 0, end: 99 } });
      expect((await text(r.stream)).length).toBeGreaterThan(0);
    } finally {
      proxy.setDecider(() => undefined);
      await c.close();
    }
  });
});
