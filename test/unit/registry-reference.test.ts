import { describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { checkDigest, isDigest } from '../../src/core/registry/digest.js';
import { formatReference, parseReference, parseRepository } from '../../src/core/registry/reference.js';

const D = 'sha256:' + 'a'.repeat(64);

describe('image references', () => {
  it.each([
    ['localhost:5000/a/b:tag', { registry: 'localhost:5000', repository: 'a/b', tag: 'tag' }],
    ['localhost/a', { registry: 'localhost', repository: 'a', tag: 'latest' }],
    ['busybox', { registry: 'docker.io', repository: 'library/busybox', tag: 'latest' }],
    ['user/app:1.0', { registry: 'docker.io', repository: 'user/app', tag: '1.0' }],
    ['docker.io/busybox:1', { registry: 'docker.io', repository: 'library/busybox', tag: '1' }],
    ['index.docker.io/library/x', { registry: 'docker.io', repository: 'library/x', tag: 'latest' }],
    ['ghcr.io/o/r@' + D, { registry: 'ghcr.io', repository: 'o/r', digest: D }],
    ['127.0.0.1:5000/x/y:t@' + D, { registry: '127.0.0.1:5000', repository: 'x/y', tag: 't', digest: D }],
    ['[::1]:5000/a__b/c-d.e', { registry: '[::1]:5000', repository: 'a__b/c-d.e', tag: 'latest' }],
  ])('parses %s', (s, want) => {
    expect(parseReference(s)).toEqual(want);
  });

  it.each([
    '',
    'a/UPPER',
    'localhost:5000/Upper/x',
    'localhost:5000/a/b:',
    'a/b:' + 'x'.repeat(129),
    'a/b:-tag',
    'a//b',
    'a/b/',
    'a/b@sha256:abc',
    'a/b@sha256:' + 'A'.repeat(64),
    'a/b@sha512:' + 'a'.repeat(128),
    'localhost:99999/a',
    'a/../b',
    'a/b?x=1',
    'a/b c',
  ])('rejects %j with InvalidArgument', (s) => {
    let err: unknown;
    try {
      parseReference(s);
    } catch (e) {
      err = e;
    }
    expect(isClass(err, 'InvalidArgument')).toBe(true);
  });

  it('formats the fully qualified form and round-trips', () => {
    expect(formatReference(parseReference('busybox'))).toBe('docker.io/library/busybox:latest');
    const s = 'localhost:5000/a/b:t@' + D;
    expect(formatReference(parseReference(s))).toBe(s);
  });

  it('parses repositories and refuses tags or digests there', () => {
    expect(parseRepository('localhost:5000/a/b')).toEqual({ registry: 'localhost:5000', repository: 'a/b' });
    expect(parseRepository('alpine')).toEqual({ registry: 'docker.io', repository: 'library/alpine' });
    expect(() => parseRepository('localhost:5000/a/b:tag')).toThrow(/tag/);
    expect(() => parseRepository('a/b@' + D)).toThrow(/digest/);
  });
});

describe('digests', () => {
  it('accepts only sha256 with 64 lowercase hex digits', () => {
    expect(isDigest(D)).toBe(true);
    for (const bad of ['sha256:' + 'a'.repeat(63), 'sha256:' + 'A'.repeat(64), 'sha256:../../etc/passwd', D + '\n', 'sha512:' + 'a'.repeat(64), 'sha256:' + 'g'.repeat(64)]) {
      expect(isDigest(bad)).toBe(false);
      expect(() => checkDigest(bad)).toThrow(/invalid digest/);
    }
  });
});
