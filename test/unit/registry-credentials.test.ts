/**
 * Credentials as Docker resolves them (auths, credHelpers, credsStore) through
 * real helper programs: small shell scripts of our own speaking the
 * docker-credential-helpers protocol, found on PATH.
 */
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CredentialResolver, helperFor, helperServerAddress, runCredentialHelper } from '../../src/core/registry/credentials.js';
import type { GearError } from '../../src/core/errors.js';

let dir: string;
let env: NodeJS.ProcessEnv;

/** A helper `docker-credential-NAME` running `body` (sh). It logs each server address it is asked about. */
function helper(name: string, body: string): void {
  const p = join(dir, `docker-credential-${name}`);
  writeFileSync(p, `#!/bin/sh\n[ "$1" = get ] || { echo "unexpected $1" >&2; exit 3; }\nread -r server\necho "$server" >> "${dir}/${name}.log"\n${body}\n`);
  chmodSync(p, 0o755);
}

function asked(name: string): string[] {
  try {
    return readFileSync(join(dir, `${name}.log`), 'utf8').trim().split('\n');
  } catch {
    return [];
  }
}

async function failure(p: Promise<unknown>): Promise<GearError> {
  try {
    await p;
  } catch (e) {
    return e as GearError;
  }
  throw new Error('expected a failure');
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'gear-credhelpers-'));
  env = { ...process.env, PATH: `${dir}:${process.env.PATH ?? '/usr/bin:/bin'}` };
  helper('good', `printf '{"ServerURL":"%s","Username":"alice","Secret":"s3cret"}' "$server"`);
  helper('token', `printf '{"ServerURL":"%s","Username":"<token>","Secret":"refresh-abc"}' "$server"`);
  helper('none', `echo "credentials not found in native keychain"; exit 1`);
  helper('broken', `echo "pass: gpg: decryption failed: No secret key" >&2; exit 1`);
  helper('garbage', `echo "hello there"`);
  helper('nouser', `printf '{"Secret":"x"}'`);
  helper('slow', `sleep 30`);
  helper('chatty', `head -c 200000 /dev/zero | tr '\\0' a`);
  helper('store', `printf '{"Username":"bob","Secret":"from-store"}'`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('credential helpers', () => {
  it('picks auths first, then credHelpers for the registry, then credsStore', () => {
    const config = { auths: { 'a.example': { auth: Buffer.from('u:p').toString('base64') } }, credHelpers: { 'b.example:5000': 'good' }, credsStore: 'store' };
    expect(helperFor(config, 'b.example:5000')).toEqual({ helper: 'good', via: 'credHelpers' });
    expect(helperFor(config, 'c.example')).toEqual({ helper: 'store', via: 'credsStore' });
    expect(helperFor({ credHelpers: { 'https://B.example:5000/v2/': 'good' } }, 'b.example:5000')).toEqual({ helper: 'good', via: 'credHelpers' });
    expect(helperFor({}, 'b.example')).toBeUndefined();
  });

  it('resolves through the whole order with real helper programs', async () => {
    const r = new CredentialResolver({ env });
    const config = {
      auths: { 'a.example': { auth: Buffer.from('u:p').toString('base64') } },
      credHelpers: { 'b.example:5000': 'good', 'tok.example': 'token', 'none.example': 'none' },
      credsStore: 'store',
    };
    expect(await r.resolve(config, 'a.example')).toEqual({ username: 'u', password: 'p' });
    expect(asked('store')).toEqual([]); // auths answered: no helper ran
    expect(await r.resolve(config, 'b.example:5000')).toEqual({ username: 'alice', password: 's3cret' });
    expect(asked('good')).toEqual(['b.example:5000']);
    expect(await r.resolve(config, 'tok.example')).toEqual({ identityToken: 'refresh-abc' });
    expect(await r.resolve(config, 'other.example')).toEqual({ username: 'bob', password: 'from-store' });
    // A helper that has nothing for the registry: no credentials, not an error.
    expect(await r.resolve(config, 'none.example')).toBeUndefined();
  });

  it('asks Docker Hub helpers about https://index.docker.io/v1/, as docker does', async () => {
    expect(helperServerAddress('docker.io')).toBe('https://index.docker.io/v1/');
    expect(await runCredentialHelper('good', 'registry-1.docker.io', { env })).toEqual({ username: 'alice', password: 's3cret' });
    expect(asked('good').pop()).toBe('https://index.docker.io/v1/');
  });

  it('keeps an answer for a while, and asks again after forget() or when it expires', async () => {
    let now = 1_000_000;
    const r = new CredentialResolver({ env, ttlMs: 60_000, now: () => now });
    const config = { credHelpers: { 'cache.example': 'good' } };
    const before = asked('good').length;
    await r.resolve(config, 'cache.example');
    await r.resolve(config, 'cache.example');
    expect(asked('good').length).toBe(before + 1);
    r.forget('cache.example');
    await r.resolve(config, 'cache.example');
    expect(asked('good').length).toBe(before + 2);
    now += 61_000;
    await r.resolve(config, 'cache.example');
    expect(asked('good').length).toBe(before + 3);
  });

  it('a failure names the helper and says what it said, and is not remembered', async () => {
    const r = new CredentialResolver({ env });
    const config = { credHelpers: { 'x.example': 'broken' } };
    const e = await failure(r.resolve(config, 'x.example'));
    expect(e.class).toBe('Unavailable');
    expect(e.message).toContain('docker-credential-broken');
    expect(e.message).toContain('config.json credHelpers');
    expect(e.message).toContain('x.example');
    expect(e.message).toContain('gpg: decryption failed');
    await failure(r.resolve(config, 'x.example'));
    expect(asked('broken').length).toBe(2);
  });

  it.each([
    ['missing', /not installed or not on PATH.*remove "missing" from config.json's credHelpers/],
    ['garbage', /did not print JSON/],
    ['nouser', /Secret without a Username/],
    ['chatty', /printed more than 65536 bytes/],
  ])('refuses helper %s with a clear error', async (name, message) => {
    const e = await failure(runCredentialHelper(name, 'y.example', { env }));
    expect(e.class).toBe('Unavailable');
    expect(e.message).toMatch(message);
  });

  it('kills a helper that does not answer in time', async () => {
    const t0 = Date.now();
    const e = await failure(runCredentialHelper('slow', 'y.example', { env, timeoutMs: 300 }));
    expect(e.message).toContain("did not answer within");
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it.each(['../../bin/sh', 'a/b', '', '-rf', 'x'.repeat(100)])('refuses the helper name %j from config.json', async (name) => {
    const r = new CredentialResolver({ env });
    if (name === '') {
      // An empty name is no helper at all.
      expect(await r.resolve({ credsStore: name }, 'z.example')).toBeUndefined();
      return;
    }
    const e = await failure(r.resolve({ credsStore: name }, 'z.example'));
    expect(e.class).toBe('InvalidArgument');
    expect(e.message).toContain('is not a helper name');
  });
});
