import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  credentialsFromConfig,
  dockerConfigPath,
  normalizeConfigKey,
  parseWWWAuthenticate,
  readDockerConfig,
  TokenCache,
} from '../../src/core/registry/auth.js';
import { isLoopbackHost } from '../../src/core/registry/transport.js';

describe('WWW-Authenticate parsing', () => {
  it('parses a Bearer challenge with quoted params', () => {
    expect(
      parseWWWAuthenticate('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull"'),
    ).toEqual([
      { scheme: 'bearer', params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/busybox:pull' } },
    ]);
  });

  it('parses Basic, mixed case, spaces, unquoted values and escapes', () => {
    expect(parseWWWAuthenticate('Basic realm="gear-test"')).toEqual([{ scheme: 'basic', params: { realm: 'gear-test' } }]);
    expect(parseWWWAuthenticate('BEARER  Realm = "a\\"b" , Service=svc')).toEqual([{ scheme: 'bearer', params: { realm: 'a"b', service: 'svc' } }]);
  });

  it('splits several challenges in one header and across header lines', () => {
    const got = parseWWWAuthenticate(['Bearer realm="r1",scope="a b", Basic realm="r2"', 'Negotiate abc==']);
    expect(got.map((c) => c.scheme)).toEqual(['bearer', 'basic', 'negotiate']);
    expect(got[0]!.params).toEqual({ realm: 'r1', scope: 'a b' });
    expect(got[1]!.params).toEqual({ realm: 'r2' });
    expect(got[2]!.params['']).toBe('abc==');
  });

  it('never throws on garbage', () => {
    for (const s of ['', ',,,', '=', '"', 'Bearer realm="unterminated', 'Bearer ,=,=', '\u0000\u00ff', 'x'.repeat(20000)]) {
      expect(() => parseWWWAuthenticate(s)).not.toThrow();
    }
    expect(parseWWWAuthenticate(undefined)).toEqual([]);
  });
});

describe('docker config.json credentials', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'gear-auth-unit-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  const b64 = (s: string) => Buffer.from(s).toString('base64');

  it('decodes base64 auth, username/password and identitytoken, matching only the exact registry', () => {
    const cfg = {
      auths: {
        'https://index.docker.io/v1/': { auth: b64('hub:pw:with:colons') },
        'http://localhost:5000': { auth: b64('local:pw') },
        'reg.example.com': { username: 'u', password: 'p' },
        'tok.example.com': { identitytoken: 'refresh-me' },
      },
    };
    expect(credentialsFromConfig(cfg, 'docker.io')).toEqual({ username: 'hub', password: 'pw:with:colons' });
    expect(credentialsFromConfig(cfg, 'localhost:5000')).toEqual({ username: 'local', password: 'pw' });
    expect(credentialsFromConfig(cfg, 'reg.example.com')).toEqual({ username: 'u', password: 'p' });
    expect(credentialsFromConfig(cfg, 'tok.example.com')).toEqual({ identityToken: 'refresh-me' });
    expect(credentialsFromConfig(cfg, 'localhost:5001')).toBeUndefined();
    expect(credentialsFromConfig(cfg, 'localhost')).toBeUndefined();
    expect(credentialsFromConfig(cfg, 'evil.reg.example.com')).toBeUndefined();
    expect(credentialsFromConfig({}, 'docker.io')).toBeUndefined();
  });

  it('normalises config keys', () => {
    expect(normalizeConfigKey('https://index.docker.io/v1/')).toBe('docker.io');
    expect(normalizeConfigKey('registry-1.docker.io')).toBe('docker.io');
    expect(normalizeConfigKey('http://Localhost:5000/v2/')).toBe('localhost:5000');
  });

  it('finds the config by explicit path, then DOCKER_CONFIG, then HOME', () => {
    expect(dockerConfigPath('/x/c.json', {})).toBe('/x/c.json');
    expect(dockerConfigPath(undefined, { DOCKER_CONFIG: '/etc/dc' })).toBe('/etc/dc/config.json');
    expect(dockerConfigPath(undefined, { HOME: '/home/u' })).toBe('/home/u/.docker/config.json');
  });

  it('reads a file; a missing file is empty; bad JSON is InvalidArgument', async () => {
    const p = join(dir, 'config.json');
    await writeFile(p, JSON.stringify({ auths: { 'r:1': { auth: b64('a:b') } } }));
    expect(credentialsFromConfig(await readDockerConfig(p), 'r:1')).toEqual({ username: 'a', password: 'b' });
    expect(await readDockerConfig(join(dir, 'absent.json'))).toEqual({});
    await writeFile(join(dir, 'bad.json'), '{nope');
    await expect(readDockerConfig(join(dir, 'bad.json'))).rejects.toMatchObject({ class: 'InvalidArgument' });
  });
});

describe('token cache', () => {
  it('keys by registry and scope set, expires with a margin, and can be invalidated', () => {
    let now = 1_000_000;
    const c = new TokenCache(() => now);
    c.set('r', ['b', 'a'], 'T', 60);
    expect(c.get('r', ['a', 'b'])).toBe('T');
    expect(c.get('r', ['a'])).toBeUndefined();
    expect(c.get('other', ['a', 'b'])).toBeUndefined();
    now += 49_000;
    expect(c.get('r', ['a', 'b'])).toBe('T');
    now += 2_000; // within the 10 s margin of expiry
    expect(c.get('r', ['a', 'b'])).toBeUndefined();
    c.set('r', ['x'], 'U');
    c.invalidate('r', ['x']);
    expect(c.get('r', ['x'])).toBeUndefined();
  });
});

describe('plain http only for loopback', () => {
  it('recognises loopback hosts', () => {
    for (const h of ['localhost', 'localhost:5000', '127.0.0.1:80', '127.3.4.5', '[::1]:5000']) expect(isLoopbackHost(h)).toBe(true);
    for (const h of ['example.com', '10.0.0.1:5000', '128.0.0.1', 'localhost.evil.com', '[::2]:5000', '127.0.0.1.nip.io']) {
      expect(isLoopbackHost(h)).toBe(false);
    }
  });
});
