/**
 * hosts.toml parsing (containerd's layout), Docker Hub mirrors and the mirror
 * router's ordering and circuit breaker: pure logic, no network.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  defaultOrigin,
  dockerHubMirrors,
  hostDirCandidates,
  HostsConfig,
  parseHostsToml,
  parseHostUrl,
} from '../../src/core/registry/hosts.js';
import { MirrorRouter, routeFor } from '../../src/core/registry/mirrors.js';
import { GearError } from '../../src/core/errors.js';

const noHttp = (h: string) => h.startsWith('127.') || h.startsWith('localhost');
const origin = (r: string) => defaultOrigin(r, noHttp);
const FILE = '/etc/containerd/certs.d/reg.example/hosts.toml';

async function parseErr(text: string, base = '/nonexistent'): Promise<string> {
  try {
    await parseHostsToml(text, FILE, base, origin('reg.example'));
  } catch (err) {
    expect(err).toBeInstanceOf(GearError);
    expect((err as GearError).class).toBe('InvalidArgument');
    return (err as Error).message;
  }
  throw new Error('expected an error');
}

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(path.join(tmpdir(), 'gear-hosts-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('parseHostUrl (containerd rules)', () => {
  it('adds https:// and /v2 as containerd does', () => {
    expect(parseHostUrl('mirror.lan:5000', false).href).toBe('https://mirror.lan:5000/v2');
    expect(parseHostUrl('http://127.0.0.1:5000', false).href).toBe('http://127.0.0.1:5000/v2');
    expect(parseHostUrl('https://m.lan/v2', false).href).toBe('https://m.lan/v2');
    expect(parseHostUrl('https://m.lan/cache/', false).href).toBe('https://m.lan/cache/v2');
    expect(parseHostUrl('https://m.lan/artifactory/api/docker/hub', true).href).toBe('https://m.lan/artifactory/api/docker/hub');
  });
  it('refuses bad URLs', () => {
    expect(() => parseHostUrl('ftp://m.lan', false)).toThrow(/only http/);
    expect(() => parseHostUrl('https://user:pw@m.lan', false)).toThrow(/credentials/);
    expect(() => parseHostUrl('https://m.lan/?x=1', false)).toThrow(/query/);
    expect(() => parseHostUrl('https://m.lan/a b', false)).toThrow(/spaces/);
    expect(() => parseHostUrl('https://', false)).toThrow();
    expect(() => parseHostUrl(`https://m.lan/${'a'.repeat(3000)}`, false)).toThrow(/longer/);
  });
});

describe('parseHostsToml', () => {
  it('lists the mirrors in file order, then the origin, with their settings', async () => {
    const hosts = await parseHostsToml(
      `server = "https://reg.example"

[host."https://b.mirror"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."https://b.mirror".header]
    x-one = "1"
    X-Many = ["a", "b"]

[host."http://a.mirror:8080/cache"]
  capabilities = ["pull"]

[host."https://p.mirror/api/hub"]
  override_path = true
`,
      FILE,
      '/nonexistent',
      origin('reg.example'),
    );
    expect(hosts.map((h) => [h.api.href, h.role])).toEqual([
      ['https://b.mirror/v2', 'mirror'],
      ['http://a.mirror:8080/cache/v2', 'mirror'],
      ['https://p.mirror/api/hub', 'mirror'],
      ['https://reg.example/v2', 'origin'],
    ]);
    expect(hosts[0]!.capabilities).toEqual({ pull: true, resolve: true, push: false });
    expect(hosts[0]!.skipVerify).toBe(true);
    expect(hosts[0]!.headers).toEqual({ 'x-one': ['1'], 'x-many': ['a', 'b'] });
    expect(hosts[1]!.capabilities).toEqual({ pull: true, resolve: false, push: false });
    expect(hosts[2]!.capabilities).toEqual({ pull: true, resolve: true, push: true });
    expect(hosts[3]!.source).toBe(FILE);
  });

  it('uses the registry itself when there is no server', async () => {
    const hosts = await parseHostsToml('[host."https://m"]\n', FILE, '/x', origin('127.0.0.1:5000'));
    expect(hosts.map((h) => h.api.href)).toEqual(['https://m/v2', 'http://127.0.0.1:5000/v2']);
    expect(hosts[1]!.role).toBe('origin');
    const hub = await parseHostsToml('[host."https://m"]\n', FILE, '/x', origin('docker.io'));
    expect(hub[1]!.api.href).toBe('https://registry-1.docker.io/v2');
  });

  it('reads ca files relative to the host directory', async () => {
    const dir = path.join(tmp, 'ca-host');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'm.crt'), '-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n');
    const hosts = await parseHostsToml('[host."https://m"]\n  ca = "m.crt"\n', FILE, dir, origin('r'));
    expect(hosts[0]!.ca[0]).toContain('BEGIN CERTIFICATE');
    await writeFile(path.join(dir, 'bad.crt'), 'not a cert');
    expect(await parseErr('[host."https://m"]\n  ca = "bad.crt"\n', dir)).toMatch(/hosts\.toml:2: CA file .*bad\.crt holds no PEM/);
    expect(await parseErr('[host."https://m"]\n  ca = "missing.crt"\n', dir)).toMatch(/hosts\.toml:2: cannot read CA file/);
  });

  it('names the file and the line of every error', async () => {
    expect(await parseErr('server = "https://r"\n[host."https://m"\n')).toMatch(/^\/etc\/containerd\/certs\.d\/reg\.example\/hosts\.toml:2:\d+: invalid TOML/);
    expect(await parseErr('\n\n[host."ftp://m"]\n')).toMatch(/hosts\.toml:3: .*only http/);
    expect(await parseErr('[host."https://u:p@m"]\n')).toMatch(/hosts\.toml:1: .*credentials in the URL are refused/);
    expect(await parseErr('[host."https://m"]\n  capabilities = ["pull", "delete"]\n')).toMatch(/hosts\.toml:2: unknown capability "delete"/);
    expect(await parseErr('[host."https://m"]\n  skip_verify = "yes"\n')).toMatch(/hosts\.toml:2: "skip_verify" must be true or false/);
    expect(await parseErr('[host."https://m"]\n  client = "c.pem"\n')).toMatch(/hosts\.toml:2: "client" .* not supported/);
    expect(await parseErr('[host."https://m"]\n  frobnicate = 1\n')).toMatch(/hosts\.toml:2: unknown setting "frobnicate"/);
    expect(await parseErr('[host."https://m".header]\n  "x-a" = "1\\r\\nInjected: yes"\n')).toMatch(/hosts\.toml:2: header x-a: value .*line break/);
    expect(await parseErr('[host."https://m".header]\n  host = "evil"\n')).toMatch(/header host cannot be set/);
    expect(await parseErr('server = 5\n')).toMatch(/hosts\.toml:1: "server" must be a URL string/);
    expect(await parseErr('host = "x"\n')).toMatch(/"host" must be tables/);
  });

  it('bounds sizes and counts', async () => {
    expect(await parseErr(`# ${'x'.repeat(70_000)}\n`)).toMatch(/larger than 65536 bytes/);
    const many = Array.from({ length: 17 }, (_, i) => `[host."https://m${i}"]\n`).join('');
    expect(await parseErr(many)).toMatch(/more than 16 hosts/);
    const headers = Array.from({ length: 33 }, (_, i) => `  h${i} = "v"\n`).join('');
    expect(await parseErr(`[host."https://m".header]\n${headers}`)).toMatch(/more than 32 headers/);
  });
});

describe('Docker Hub mirrors and the directory layout', () => {
  it('parses registry-mirrors URLs and refuses bad ones', () => {
    const m = dockerHubMirrors(['https://mirror.gcr.io', 'http://127.0.0.1:5001/']);
    expect(m.map((h) => [h.api.href, h.role, h.capabilities.push])).toEqual([
      ['https://mirror.gcr.io/v2', 'mirror', false],
      ['http://127.0.0.1:5001/v2', 'mirror', false],
    ]);
    expect(() => dockerHubMirrors(['file:///etc/passwd'])).toThrow(/--registry-mirror: .*only http/);
  });

  it('looks in host_port_, host:port, then _default (containerd order)', () => {
    expect(hostDirCandidates('/d', 'reg:5000')).toEqual(['/d/reg_5000_', '/d/reg:5000', '/d/_default']);
    expect(hostDirCandidates('/d', 'docker.io')).toEqual(['/d/docker.io', '/d/_default']);
  });

  it('reads the registry directory, else _default; Docker Hub mirrors go before docker.io', async () => {
    const dir = path.join(tmp, 'certs.d');
    await mkdir(path.join(dir, 'reg_5000_'), { recursive: true });
    await mkdir(path.join(dir, '_default'), { recursive: true });
    await mkdir(path.join(dir, 'docker.io'), { recursive: true });
    await writeFile(path.join(dir, 'reg_5000_', 'hosts.toml'), '[host."https://port-mirror"]\n');
    await writeFile(path.join(dir, '_default', 'hosts.toml'), '[host."https://default-mirror"]\n');
    await writeFile(path.join(dir, 'docker.io', 'hosts.toml'), 'server = "https://registry-1.docker.io"\n[host."https://hub-toml"]\n');
    const cfg = new HostsConfig({ configDir: dir, dockerHubMirrors: ['https://hub-flag'], allowsHttp: noHttp });
    expect((await cfg.hosts('reg:5000')).map((h) => h.api.host)).toEqual(['port-mirror', 'reg:5000']);
    expect((await cfg.hosts('other.example')).map((h) => h.api.host)).toEqual(['default-mirror', 'other.example']);
    expect((await cfg.hosts('docker.io')).map((h) => h.api.host)).toEqual(['hub-toml', 'hub-flag', 'registry-1.docker.io']);
    expect(await cfg.validate()).toBe(3);
    await writeFile(path.join(dir, '_default', 'hosts.toml'), '[host."gopher://x"]\n');
    await expect(cfg.validate()).rejects.toThrow(/_default\/hosts\.toml:1: .*only http/);
    const none = new HostsConfig({ configDir: path.join(tmp, 'absent'), allowsHttp: noHttp });
    expect((await none.hosts('reg:5000')).map((h) => h.api.href)).toEqual(['https://reg:5000/v2']);
  });
});

describe('MirrorRouter', () => {
  it('adds ?ns= for mirrors only, and keys auth by the mirror host', () => {
    const [m] = dockerHubMirrors(['https://m.lan:5000']);
    const r = routeFor('docker.io', m!);
    expect(r.path('/library/a/blobs/sha256:x')).toBe('/v2/library/a/blobs/sha256:x?ns=docker.io');
    expect(r.authKey).toBe('m.lan:5000');
    const o = routeFor('docker.io', origin('docker.io'));
    expect(o.path('/library/a/manifests/1')).toBe('/v2/library/a/manifests/1');
    expect(o.authKey).toBe('docker.io');
  });

  it('benches a failed mirror behind the origin for a bounded, doubling time', async () => {
    let now = 1_000_000;
    const cfg = new HostsConfig({ dockerHubMirrors: ['https://a', 'https://b'], allowsHttp: noHttp });
    const router = new MirrorRouter(cfg, { openMs: 1000, maxOpenMs: 4000, now: () => now });
    const order = async () => (await router.routes('docker.io', 'pull')).map((r) => r.base.host);
    expect(await order()).toEqual(['a', 'b', 'registry-1.docker.io']);
    const a = (await cfg.hosts('docker.io'))[0]!;
    router.markFailed(a);
    expect(await order()).toEqual(['b', 'registry-1.docker.io', 'a']);
    now += 1001;
    expect(await order()).toEqual(['a', 'b', 'registry-1.docker.io']);
    for (let i = 0; i < 10; i++) router.markFailed(a);
    now += 3999;
    expect(router.isBenched(a)).toBe(true);
    now += 2;
    expect(router.isBenched(a)).toBe(false);
    router.markFailed(a);
    router.markOk(a);
    expect(router.isBenched(a)).toBe(false);
  });

  it('falls through mirror failures to the origin and counts them; a 404 does not bench', async () => {
    const cfg = new HostsConfig({ dockerHubMirrors: ['https://a', 'https://b'], allowsHttp: noHttp });
    const router = new MirrorRouter(cfg);
    const tried: string[] = [];
    const v = await router.run('docker.io', 'pull', undefined, 'GET x', async (route) => {
      tried.push(route.base.host);
      if (route.base.host === 'a') throw new GearError('Unavailable', 'a: 503');
      if (route.base.host === 'b') throw new GearError('NotFound', 'b: 404');
      return 42;
    });
    expect(v).toBe(42);
    expect(tried).toEqual(['a', 'b', 'registry-1.docker.io']);
    const hosts = await cfg.hosts('docker.io');
    expect(router.isBenched(hosts[0]!)).toBe(true);
    expect(router.isBenched(hosts[1]!)).toBe(false);
    expect(router.counters).toEqual({ mirror: { ok: 0, not_found: 1, failed: 1 }, origin: { ok: 1, not_found: 0, failed: 0 }, fallthroughs: 2 });
  });

  it('gives a mirror at most mirrorTimeoutMs to answer, then the origin', async () => {
    const cfg = new HostsConfig({ dockerHubMirrors: ['https://slow'], allowsHttp: noHttp });
    const router = new MirrorRouter(cfg, { mirrorTimeoutMs: 100 });
    const t0 = Date.now();
    const v = await router.run('docker.io', 'pull', undefined, 'GET x', async (route, signal) => {
      if (route.role === 'mirror') {
        await new Promise((_, reject) => signal!.addEventListener('abort', () => reject(signal!.reason)));
      }
      return route.base.host;
    });
    expect(v).toBe('registry-1.docker.io');
    expect(Date.now() - t0).toBeLessThan(2000);
  });

  it('the origin error is final and names the mirrors tried', async () => {
    const cfg = new HostsConfig({ dockerHubMirrors: ['https://a'], allowsHttp: noHttp });
    const router = new MirrorRouter(cfg);
    await expect(
      router.run('docker.io', 'pull', undefined, 'GET x', async (route) => {
        throw new GearError('NotFound', `${route.base.host}: 404`);
      }),
    ).rejects.toThrow(/registry-1\.docker\.io: 404 \(mirrors tried first: a: a: 404\)/);
  });

  it('an aborted caller stops at once (no fall through)', async () => {
    const cfg = new HostsConfig({ dockerHubMirrors: ['https://a'], allowsHttp: noHttp });
    const router = new MirrorRouter(cfg);
    const ac = new AbortController();
    const tried: string[] = [];
    await expect(
      router.run('docker.io', 'pull', ac.signal, 'GET x', async (route) => {
        tried.push(route.base.host);
        ac.abort(new Error('caller gave up'));
        throw new Error('aborted');
      }),
    ).rejects.toThrow();
    expect(tried).toEqual(['a']);
  });
});
