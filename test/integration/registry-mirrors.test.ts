/**
 * Registry mirrors with failover, against two real registries (Debian
 * docker-registry 2.8): the origin O, seen through a forwarding proxy that
 * records every request (so we know what it served), and a mirror M holding
 * the same repositories, seen through a fault proxy that can refuse, hang or
 * corrupt. A containerd-style hosts.toml names M as O's mirror.
 *
 * - the registry client: manifests, blobs and ranges come from M (with
 *   ?ns=<origin>), never from O; a refused, hanging or corrupting M falls
 *   through to O within the deadline, and a failed M is benched;
 * - `gear copy` and `gear convert` read their source through M;
 * - a Gear dockerd (`gear daemon --registry-config-dir`) runs an image lazily
 *   with its Gear files from M (O sees no GET of them); with M dead, and with
 *   M corrupting every body, from O, with the right bytes.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { request as httpRequest } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import { Fetcher } from '../../src/core/fetcher/fetcher.js';
import { openPool } from '../../src/core/pool/pool.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { DigestMismatchError } from '../../src/core/registry/digest.js';
import { startGearContainerd } from '../helpers/containerd.js';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive, writeOciImage } from '../helpers/oci-images.js';
import { run, runOk } from '../helpers/proc.js';
import { startFaultProxy, type FaultAction, type FaultProxy } from '../helpers/proxy.js';
import { freePort, startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');

let O: TestRegistry;
let M: TestRegistry;
let origin: FaultProxy; // forwards everything to O; records what O was asked
let mirror: FaultProxy; // in front of M; faults on demand
let mirrorFault: FaultAction | undefined;
let work: string;
let certs: string;
let gearRef: string;
let gearIndex: IndexManifest;
let gearManifest: { config: { digest: string }; layers: { digest: string }[] };
let plainRef: string;
const data = {
  random: randomBytes(300_000), // a raw Gear file
  text: Buffer.from('mirrors serve Gear files too\n'.repeat(20_000)), // a gzip Gear file
  big: randomBytes(3 << 20),
};

async function gear(args: string[]): Promise<string> {
  return (await runOk(process.execPath, [GEAR_CLI, ...args], { timeoutMs: 300_000 })).stdout;
}

/** Blob GETs (path without query) a proxy has seen since `from`. */
function blobGets(p: FaultProxy, from = 0): string[] {
  return p.seen.slice(from).filter((l) => /^GET \/v2\/.*\/blobs\/sha256:/.test(l));
}

/** Copy an OCI layout's blobs and its manifest into `reg`/repo:tag (byte for byte). */
async function pushLayout(client: RegistryClient, layout: string, target: string, tag: string): Promise<void> {
  const idx = JSON.parse(readFileSync(join(layout, 'index.json'), 'utf8')) as { manifests: { digest: string; mediaType: string; annotations?: Record<string, string> }[] };
  const repo = target.replace(/:[^:/]+$/, '');
  for (const f of readdirSync(join(layout, 'blobs', 'sha256'))) {
    await client.pushBlob(repo, `sha256:${f}`, readFileSync(join(layout, 'blobs', 'sha256', f)));
  }
  const m = idx.manifests.find((x) => x.annotations?.['org.opencontainers.image.ref.name'] === tag)!;
  await client.putManifest(target, readFileSync(join(layout, 'blobs', 'sha256', m.digest.slice(7))), { mediaType: m.mediaType });
}

function hostsToml(mirrorUrl: string): string {
  return `# the origin registry O, through its recording proxy
server = "${origin.url}"

[host."${mirrorUrl}"]
  capabilities = ["pull", "resolve"]
  [host."${mirrorUrl}".header]
    x-gear-test = "mirror"
`;
}

beforeAll(async () => {
  work = mkdtempSync('/tmp/gear-mirrors-it-');
  O = await startRegistry();
  M = await startRegistry();
  origin = await startFaultProxy(O.url);
  mirror = await startFaultProxy(M.url, (req) => (req.method === 'GET' ? mirrorFault : undefined));
  // O's directory in the host_port_ form (containerd looks there first).
  certs = join(work, 'certs.d');
  const dir = join(certs, origin.host.replace(/:(\d+)$/, '_$1_'));
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'hosts.toml'), hostsToml(mirror.url));

  // A Gear image in O (its index names O's proxy as the files' location), copied byte for byte to M.
  const tar = join(work, 'src.tar');
  await writeDockerArchive(
    tar,
    [[...(await busyboxLayer()), { path: 'data/', type: 'dir' }, { path: 'data/random', content: data.random }, { path: 'data/text', content: data.text }, { path: 'data/big', content: data.big }]],
    'gear-test/mirrors:latest',
  );
  gearRef = `${origin.host}/team/app:gear`;
  await gear(['convert', '--no-progress', '--json', '--format-version', '2', '--registry-config-dir', '', `docker-archive:${tar}`, gearRef]);
  const layout = join(work, 'gear-layout');
  await gear(['copy', '--json', '--no-progress', '--registry-config-dir', '', gearRef, `oci:${layout}:gear`]);
  const plain = new RegistryClient();
  try {
    await pushLayout(plain, layout, `${M.host}/team/app:gear`, 'gear');
    const m = await plain.getManifest(`${O.host}/team/app:gear`);
    gearManifest = m.manifest as typeof gearManifest;
    const layer = await plain.fetchBlob(`${O.host}/team/app`, gearManifest.layers[0]!.digest);
    gearIndex = (await readIndexLayer((async function* () { yield gunzipSync(layer); })())).manifest;
    // A plain (not Gear) image in both, for gear convert.
    const plainLayout = join(work, 'plain-layout');
    await writeOciImage(plainLayout, [[{ path: 'etc/', type: 'dir' }, { path: 'etc/hello', content: 'hello from the mirror\n' }]], { tag: '1' });
    await pushLayout(plain, plainLayout, `${O.host}/plain/app:1`, '1');
    await pushLayout(plain, plainLayout, `${M.host}/plain/app:1`, '1');
    plainRef = `${origin.host}/plain/app:1`;
  } finally {
    await plain.close();
  }
}, 300_000);

afterAll(async () => {
  await mirror?.stop();
  await origin?.stop();
  await O?.stop();
  await M?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

function client(mirrorTimeoutMs = 5_000): RegistryClient {
  return new RegistryClient({ mirrors: { configDir: certs, mirrorTimeoutMs } });
}

const fileBlob = (path: string) => {
  const f = gearIndex.files.find((x) => x.path === path || x.path === `/${path}`);
  if (!f) throw new Error(`no ${path} in the index (${gearIndex.files.map((x) => x.path).join(', ')})`);
  return { digest: f.blob?.digest ?? f.digest, size: f.blob?.size ?? f.size, gzip: Boolean(f.blob) };
};

describe('registry client through a mirror', () => {
  it('takes manifests, blobs and ranges from the mirror (with ?ns=), never from the origin', async () => {
    mirrorFault = undefined;
    const c = client();
    const o0 = origin.count;
    const m0 = mirror.seen.length;
    try {
      const img = await c.resolveImage(gearRef);
      expect(img.manifest).toEqual(gearManifest);
      const r = fileBlob('data/random');
      const dest = join(work, 'random.blob');
      await c.fetchBlobVerified(`${origin.host}/team/app`, r.digest, dest, { expectedSize: r.size });
      expect(readFileSync(dest).equals(data.random)).toBe(true);
      const b = fileBlob('data/big');
      const part = await c.openBlob(`${origin.host}/team/app`, b.digest, { range: { start: 1000, end: 1999 } });
      const chunks: Buffer[] = [];
      for await (const x of part.stream) chunks.push(x as Buffer);
      expect(Buffer.concat(chunks).equals(data.big.subarray(1000, 2000))).toBe(true);
      expect(c.routeCounters()).toMatchObject({ mirror: { ok: 3, failed: 0 }, origin: { ok: 0 } });
    } finally {
      await c.close();
    }
    expect(origin.count).toBe(o0);
    const seen = mirror.seen.slice(m0);
    expect(seen.length).toBeGreaterThanOrEqual(3);
    for (const l of seen) expect(l).toContain(`ns=${encodeURIComponent(origin.host)}`);
  });

  it('a refused mirror falls through to the origin, and is benched (the next fetch does not try it)', async () => {
    mirrorFault = { kind: 'reset' };
    const c = client();
    try {
      const r = fileBlob('data/random');
      const o0 = blobGets(origin).length;
      const got = await c.fetchBlob(`${origin.host}/team/app`, r.digest, { expectedSize: r.size });
      expect(got.equals(data.random)).toBe(true);
      expect(blobGets(origin).length).toBe(o0 + 1);
      const m1 = mirror.count;
      const got2 = await c.fetchBlob(`${origin.host}/team/app`, r.digest, { expectedSize: r.size });
      expect(got2.equals(data.random)).toBe(true);
      expect(mirror.count).toBe(m1); // benched
      expect(c.routeCounters()).toMatchObject({ mirror: { failed: 1 }, origin: { ok: 2 } });
    } finally {
      await c.close();
      mirrorFault = undefined;
    }
  });

  it('a mirror answering 503 or 404 falls through; a hanging mirror costs at most the mirror timeout', async () => {
    const r = fileBlob('data/random');
    for (const fault of [{ kind: 'status', status: 503 }, { kind: 'status', status: 404 }] as FaultAction[]) {
      mirrorFault = fault;
      const c = client();
      try {
        expect((await c.fetchBlob(`${origin.host}/team/app`, r.digest)).equals(data.random)).toBe(true);
      } finally {
        await c.close();
      }
    }
    mirrorFault = { kind: 'hang' };
    const c = client(1_000);
    try {
      const t0 = Date.now();
      const m = await c.getManifest(gearRef);
      expect(m.manifest).toEqual(gearManifest);
      expect(Date.now() - t0).toBeLessThan(5_000);
    } finally {
      await c.close();
      mirrorFault = undefined;
    }
  });

  it('a corrupting mirror is rejected: verified reads come from the origin, a streamed whole blob ends with DigestMismatchError', async () => {
    mirrorFault = { kind: 'flip' };
    const r = fileBlob('data/random');
    const c = client();
    try {
      const o0 = blobGets(origin).length;
      expect((await c.fetchBlob(`${origin.host}/team/app`, r.digest)).equals(data.random)).toBe(true);
      expect(blobGets(origin).length).toBe(o0 + 1);
    } finally {
      await c.close();
    }
    const c2 = client();
    try {
      const s = await c2.openBlob(`${origin.host}/team/app`, r.digest, { expectedSize: r.size });
      expect(s.mirror?.host).toBe(mirror.host);
      const err = await (async () => {
        try {
          for await (const _ of s.stream) void _;
        } catch (e) {
          return e;
        }
        return undefined;
      })();
      expect(err).toBeInstanceOf(DigestMismatchError);
      expect(String((err as Error).message)).toContain(`mirror ${mirror.host}`);
      // benched: the next open goes to the origin
      const s2 = await c2.openBlob(`${origin.host}/team/app`, r.digest, { expectedSize: r.size });
      expect(s2.mirror).toBeUndefined();
      s2.stream.destroy();
    } finally {
      await c2.close();
      mirrorFault = undefined;
    }
  });

  it('the fetcher: a first download from a corrupting mirror is not final; the next try comes from the origin, verified', async () => {
    mirrorFault = { kind: 'flip' };
    const root = mkdtempSync(join(work, 'pool-'));
    const pool = await openPool({ root });
    const c = client();
    const fetcher = new Fetcher({ pool, client: c, timeoutMs: 20_000 });
    try {
      for (const [name, content] of [['data/random', data.random], ['data/text', data.text]] as const) {
        const f = gearIndex.files.find((x) => x.path === name || x.path === `/${name}`)!;
        const m0 = blobGets(mirror).length;
        const o0 = blobGets(origin).length;
        await fetcher.fetch({ digest: f.digest, size: f.size, blob: f.blob, location: { registry: origin.host, repository: 'team/app' } });
        expect(readFileSync(pool.path(f.digest)).equals(content), name).toBe(true);
        expect(blobGets(mirror).length, `${name}: the mirror was tried first`).toBe(m0 + 1);
        expect(blobGets(origin).length, `${name}: then the origin`).toBe(o0 + 1);
        c.mirrorRouter!.markOk((await c.mirrorRouter!.hosts.hosts(origin.host))[0]!); // un-bench for the next file
      }
      expect(fetcher.stats().verifyFailures).toBe(2);
    } finally {
      await fetcher.close();
      await c.close();
      await pool.close();
      mirrorFault = undefined;
    }
  });

  it('Docker Hub mirrors (--registry-mirror) go before docker.io, with ?ns=docker.io', async () => {
    mirrorFault = undefined;
    // docker.io's server is pointed at O here, so that nothing can leave the machine.
    const hub = join(work, 'hub-certs');
    mkdirSync(join(hub, 'docker.io'), { recursive: true });
    writeFileSync(join(hub, 'docker.io', 'hosts.toml'), `server = "${origin.url}"\n`);
    const r = fileBlob('data/random');
    const o0 = origin.count;
    const m0 = mirror.seen.length;
    const c = new RegistryClient({ mirrors: { configDir: hub, dockerHubMirrors: [mirror.url] } });
    try {
      const m = await c.getManifest('docker.io/team/app:gear');
      expect(m.manifest).toEqual(gearManifest);
      expect((await c.fetchBlob('docker.io/team/app', r.digest)).equals(data.random)).toBe(true);
    } finally {
      await c.close();
    }
    expect(origin.count).toBe(o0);
    expect(mirror.seen.slice(m0)).toEqual([
      'GET /v2/team/app/manifests/gear?ns=docker.io',
      `GET /v2/team/app/blobs/${r.digest}?ns=docker.io`,
    ]);
    const bad = await run(process.execPath, [GEAR_CLI, 'copy', '--registry-mirror', 'ftp://mirror.example', 'docker.io/a/b:1', 'oci:/nonexistent'], { timeoutMs: 60_000 });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/--registry-mirror.*ftp:\/\/mirror\.example.*only http/);
  });

  it('a mirror with its own login: its credentials, not the origin\'s', async () => {
    const A = await startRegistry({ htpasswd: true });
    const p = join(work, 'authed-certs');
    mkdirSync(join(p, origin.host), { recursive: true });
    writeFileSync(join(p, origin.host, 'hosts.toml'), `[host."http://${A.host}"]\n  capabilities = ["pull"]\n`);
    try {
      const seed = new RegistryClient({ credentials: { [A.host]: A.credentials! } });
      const r = fileBlob('data/random');
      await seed.pushBlob(`${A.host}/team/app`, r.digest, data.random);
      await seed.close();
      const o0 = blobGets(origin).length;
      const c = new RegistryClient({ credentials: { [A.host]: A.credentials! }, mirrors: { configDir: p } });
      try {
        expect((await c.fetchBlob(`${origin.host}/team/app`, r.digest)).equals(data.random)).toBe(true);
        expect(c.routeCounters()).toMatchObject({ mirror: { ok: 1 } });
      } finally {
        await c.close();
      }
      expect(blobGets(origin).length).toBe(o0);
    } finally {
      await A.stop();
    }
  });
});

describe('a TLS mirror: hosts.toml ca and skip_verify', () => {
  /** An https server on 127.0.0.1 forwarding to M, with a certificate of our own CA. */
  async function tlsMirror(dir: string): Promise<{ url: string; seen: string[]; stop(): Promise<void> }> {
    mkdirSync(dir, { recursive: true });
    const ssl = (args: string[]) => runOk('openssl', args, { timeoutMs: 60_000, cwd: dir });
    await ssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=gear test CA']);
    await ssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'srv.key', '-out', 'srv.csr', '-subj', '/CN=127.0.0.1']);
    writeFileSync(join(dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1\n');
    await ssl(['x509', '-req', '-in', 'srv.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'srv.crt', '-days', '2', '-extfile', 'ext.cnf']);
    const seen: string[] = [];
    const target = new URL(M.url);
    const server = createHttpsServer({ key: readFileSync(join(dir, 'srv.key')), cert: readFileSync(join(dir, 'srv.crt')) }, (req, res) => {
      seen.push(`${req.method} ${req.url}`);
      const up = httpRequest({ host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode ?? 502, r.headers);
        r.pipe(res);
      });
      up.on('error', () => res.destroy());
      req.pipe(up);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as { port: number }).port;
    return {
      url: `https://127.0.0.1:${port}`,
      seen,
      stop: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
    };
  }

  it('trusts the mirror with its ca, falls through without it, and with skip_verify', async () => {
    const dir = join(work, 'tls');
    const tls = await tlsMirror(join(dir, 'pki'));
    const r = fileBlob('data/random');
    try {
      const cases: Array<[string, string, 'mirror' | 'origin']> = [
        ['with-ca', `  ca = "${join(dir, 'pki', 'ca.crt')}"\n`, 'mirror'],
        ['no-ca', '', 'origin'],
        ['skip-verify', '  skip_verify = true\n', 'mirror'],
      ];
      for (const [name, extra, from] of cases) {
        const cfg = join(dir, name);
        mkdirSync(join(cfg, origin.host), { recursive: true });
        writeFileSync(join(cfg, origin.host, 'hosts.toml'), `[host."${tls.url}"]\n  capabilities = ["pull"]\n${extra}`);
        const c = new RegistryClient({ mirrors: { configDir: cfg } });
        const t0 = tls.seen.length;
        try {
          expect((await c.fetchBlob(`${origin.host}/team/app`, r.digest)).equals(data.random), name).toBe(true);
          expect(c.routeCounters()![from].ok, name).toBe(1);
          expect(tls.seen.length - t0, name).toBe(from === 'mirror' ? 1 : 0); // an untrusted certificate: no request is sent
        } finally {
          await c.close();
        }
      }
    } finally {
      await tls.stop();
    }
  });
});

describe('gear copy and gear convert read their source through the mirror', () => {
  it('gear copy: the source blobs come from the mirror', async () => {
    mirrorFault = undefined;
    const o0 = blobGets(origin).length;
    const m0 = blobGets(mirror).length;
    const out = JSON.parse(await gear(['copy', '--json', '--no-progress', '--registry-config-dir', certs, gearRef, `oci:${join(work, 'copied')}:x`])) as { blobsCopied: number; blobs: number };
    expect(out.blobsCopied).toBe(out.blobs);
    expect(blobGets(origin).length).toBe(o0);
    expect(blobGets(mirror).length - m0).toBeGreaterThanOrEqual(out.blobs);
  });

  it('gear convert: the source image comes from the mirror, the result goes to the destination', async () => {
    mirrorFault = undefined;
    const o0 = blobGets(origin).length;
    const m0 = blobGets(mirror).length;
    await gear(['convert', '--no-progress', '--json', '--registry-config-dir', certs, plainRef, `${M.host}/converted/app:gear`]);
    expect(blobGets(origin).length).toBe(o0);
    expect(blobGets(mirror).length).toBeGreaterThan(m0);
  });
});

describe('lazy run through a mirror (gear daemon --registry-config-dir)', () => {
  /** gear_registry_requests_total by "role/outcome", scraped from the daemon. */
  async function scrape(address: string): Promise<Record<string, number>> {
    const text = await (await fetch(`http://${address}/metrics`)).text();
    const out: Record<string, number> = {};
    for (const m of text.matchAll(/^gear_registry_requests_total\{role="(\w+)",outcome="(\w+)"\} (\d+)$/gm)) out[`${m[1]}/${m[2]}`] = Number(m[3]);
    return out;
  }

  async function lazyRun(): Promise<{ out: string[]; originGearGets: string[]; requests: Record<string, number> }> {
    let d: Dockerd | undefined;
    const o0 = origin.seen.length;
    const metrics = `127.0.0.1:${await freePort()}`;
    try {
      d = await startDockerd({
        driver: 'gear',
        gearArgs: ['--fetch-timeout', '20s', '--registry-config-dir', certs, '--registry-mirror-timeout', '2s', '--metrics-address', metrics],
      });
      await d.dockerOk(['pull', gearRef]);
      const res = await d.dockerOk(['run', '--rm', gearRef, 'sh', '-c', 'sha256sum /data/random /data/text /data/big | cut -c1-64']);
      // dockerd itself pulls the manifest, config and index layer from the origin; Gear files are the daemon's.
      const pulled = new Set([gearManifest.config.digest, ...gearManifest.layers.map((l) => l.digest)]);
      const originGearGets = blobGets(origin, o0).filter((l) => ![...pulled].some((dg) => l.includes(dg)));
      return { out: res.stdout.trim().split('\n'), originGearGets, requests: await scrape(metrics) };
    } finally {
      await d?.stop();
    }
  }
  const want = () => [hex(data.random), hex(data.text), hex(data.big)];

  it('Gear files come from the mirror: the origin sees no GET of them', async () => {
    expect(await gearDaemonAvailable(), "gear daemon must be buildable and runnable here").toBe(true);
    mirrorFault = undefined;
    const m0 = blobGets(mirror).length;
    const r = await lazyRun();
    expect(r.out).toEqual(want());
    expect(r.originGearGets).toEqual([]);
    expect(blobGets(mirror).length - m0).toBeGreaterThanOrEqual(3);
    expect(r.requests['mirror/ok']).toBeGreaterThanOrEqual(3);
    expect(r.requests['origin/ok']).toBe(0);
  });

  it('the mirror dead: the Gear files come from the origin', async () => {
    expect(await gearDaemonAvailable(), "gear daemon must be buildable and runnable here").toBe(true);
    mirrorFault = { kind: 'reset' };
    try {
      const r = await lazyRun();
      expect(r.out).toEqual(want());
      expect(r.originGearGets.length).toBeGreaterThanOrEqual(3);
      expect(r.requests['mirror/failed']).toBeGreaterThanOrEqual(1);
      expect(r.requests['origin/ok']).toBeGreaterThanOrEqual(3);
    } finally {
      mirrorFault = undefined;
    }
  });

  it('the mirror corrupting every body: rejected, the origin serves, the bytes are right', async () => {
    expect(await gearDaemonAvailable(), "gear daemon must be buildable and runnable here").toBe(true);
    mirrorFault = { kind: 'flip' };
    const m0 = blobGets(mirror).length;
    try {
      const r = await lazyRun();
      expect(blobGets(mirror).length).toBeGreaterThan(m0); // the mirror was asked (and lied)
      expect(r.out).toEqual(want());
      expect(r.originGearGets.length).toBeGreaterThanOrEqual(1);
    } finally {
      mirrorFault = undefined;
    }
  });
});

describe('lazy run through a mirror (gear snapshotter under containerd 1.6)', () => {
  it('Gear files come from the mirror: the origin sees no GET of them', async () => {
    mirrorFault = undefined;
    const o0 = origin.seen.length;
    const m0 = blobGets(mirror).length;
    const c = await startGearContainerd({ tasks: ['mirrored'], gearArgs: ['--fetch-timeout', '20s', '--registry-config-dir', certs] });
    try {
      await c.ctrOk(['image', 'pull', '--plain-http', '--snapshotter', 'gear', gearRef], 300_000);
      const out = await c.ctrOk(
        ['run', '--snapshotter', 'gear', '--rm', gearRef, 'mirrored', '/bin/busybox', 'sh', '-c', 'sha256sum /data/random /data/text /data/big | cut -c1-64'],
        180_000,
      );
      expect(out.trim().split('\n')).toEqual([hex(data.random), hex(data.text), hex(data.big)]);
    } finally {
      await c.stop();
    }
    const pulled = [gearManifest.config.digest, ...gearManifest.layers.map((l) => l.digest)];
    expect(blobGets(origin, o0).filter((l) => !pulled.some((d) => l.includes(d)))).toEqual([]);
    expect(blobGets(mirror).length - m0).toBeGreaterThanOrEqual(3);
  });
});
