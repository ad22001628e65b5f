import { describe, expect, it } from 'vitest';
import { selectPlatformManifest } from '../../src/core/registry/platform.js';
import {
  backoffDelay,
  DEFAULT_RETRY,
  isRetryableNetworkError,
  isRetryableStatus,
  nextRetryDelay,
  parseRetryAfter,
  sleep,
} from '../../src/core/registry/retry.js';
import { MediaType, parseManifest, type ImageIndex } from '../../src/core/registry/media-types.js';

const opts = { maxAttempts: 5, minDelayMs: 100, maxDelayMs: 1000, maxTotalMs: 3000 };

describe('backoff', () => {
  it('doubles per attempt within [d/2, d] and is capped', () => {
    expect(backoffDelay(1, opts, () => 0)).toBe(50);
    expect(backoffDelay(1, opts, () => 1)).toBe(100);
    expect(backoffDelay(3, opts, () => 1)).toBe(400);
    expect(backoffDelay(10, opts, () => 1)).toBe(1000);
    expect(backoffDelay(1000, opts, () => 0.5)).toBe(750);
  });

  it('stops after maxAttempts and before the total deadline', () => {
    expect(nextRetryDelay(4, 0, opts, undefined, () => 1)).toBe(800);
    expect(nextRetryDelay(5, 0, opts, undefined, () => 1)).toBeUndefined();
    expect(nextRetryDelay(1, 2950, opts, undefined, () => 1)).toBeUndefined();
  });

  it('honours Retry-After up to the cap', () => {
    expect(nextRetryDelay(1, 0, opts, 700, () => 0)).toBe(700);
    expect(nextRetryDelay(1, 0, opts, 60_000, () => 0)).toBe(1000);
    expect(nextRetryDelay(1, 2500, opts, 900, () => 0)).toBeUndefined();
  });

  it('parses Retry-After seconds and HTTP dates', () => {
    const now = Date.parse('2026-01-01T00:00:00Z');
    expect(parseRetryAfter('3', now)).toBe(3000);
    expect(parseRetryAfter('Thu, 01 Jan 2026 00:00:05 GMT', now)).toBe(5000);
    expect(parseRetryAfter('Wed, 31 Dec 2025 00:00:00 GMT', now)).toBe(0);
    expect(parseRetryAfter('-1', now)).toBeUndefined();
    expect(parseRetryAfter('soon', now)).toBeUndefined();
    expect(parseRetryAfter(undefined, now)).toBeUndefined();
  });

  it('has sane defaults', () => {
    expect(DEFAULT_RETRY.maxAttempts).toBeGreaterThan(1);
    expect(DEFAULT_RETRY.maxTotalMs).toBeLessThanOrEqual(120_000);
  });

  it('classifies statuses and network errors', () => {
    for (const s of [429, 500, 502, 503, 504]) expect(isRetryableStatus(s)).toBe(true);
    for (const s of [200, 400, 401, 403, 404, 416, 501]) expect(isRetryableStatus(s)).toBe(false);
    expect(isRetryableNetworkError(Object.assign(new Error('x'), { code: 'ECONNRESET' }))).toBe(true);
    expect(isRetryableNetworkError(new Error('x', { cause: Object.assign(new Error('y'), { code: 'UND_ERR_SOCKET' }) }))).toBe(true);
    expect(isRetryableNetworkError(new Error('x'))).toBe(false);
  });

  it('sleep rejects with the abort reason', async () => {
    const ac = new AbortController();
    const p = sleep(10_000, ac.signal);
    ac.abort(new Error('stop'));
    await expect(p).rejects.toThrow('stop');
  });
});

describe('platform selection and manifest validation', () => {
  const d = (c: string) => 'sha256:' + c.repeat(64);
  const index: ImageIndex = {
    schemaVersion: 2,
    manifests: [
      { mediaType: MediaType.OciManifest, digest: d('1'), size: 1, platform: { os: 'linux', architecture: 'amd64' } },
      { mediaType: MediaType.OciManifest, digest: d('2'), size: 1, platform: { os: 'linux', architecture: 'arm', variant: 'v6' } },
      { mediaType: MediaType.OciManifest, digest: d('3'), size: 1, platform: { os: 'linux', architecture: 'arm', variant: 'v7' } },
      { mediaType: MediaType.OciManifest, digest: d('4'), size: 1, platform: { os: 'linux', architecture: 'arm64' } },
      {
        mediaType: MediaType.OciManifest,
        digest: d('5'),
        size: 1,
        platform: { os: 'unknown', architecture: 'unknown' },
        annotations: { 'vnd.docker.reference.type': 'attestation-manifest' },
      },
    ],
  };
  it('matches os, architecture and variant (arm64 without variant is v8)', () => {
    expect(selectPlatformManifest(index, { os: 'linux', architecture: 'amd64' })?.digest).toBe(d('1'));
    expect(selectPlatformManifest(index, { os: 'linux', architecture: 'x86_64' })?.digest).toBe(d('1'));
    expect(selectPlatformManifest(index, { os: 'linux', architecture: 'arm', variant: 'v7' })?.digest).toBe(d('3'));
    expect(selectPlatformManifest(index, { os: 'linux', architecture: 'arm64', variant: 'v8' })?.digest).toBe(d('4'));
    expect(selectPlatformManifest(index, { os: 'windows', architecture: 'amd64' })).toBeUndefined();
    expect(selectPlatformManifest(index, { os: 'unknown', architecture: 'unknown' })).toBeUndefined();
  });

  it('rejects manifests with bad descriptors', () => {
    const ok = { schemaVersion: 2, mediaType: MediaType.OciManifest, config: { mediaType: 'x', digest: d('a'), size: 2 }, layers: [] };
    expect(parseManifest(Buffer.from(JSON.stringify(ok))).mediaType).toBe(MediaType.OciManifest);
    const bad = { ...ok, layers: [{ mediaType: 'x', digest: 'sha256:../../x', size: 1 }] };
    expect(() => parseManifest(Buffer.from(JSON.stringify(bad)))).toThrow(/digest/);
    expect(() => parseManifest(Buffer.from(JSON.stringify({ ...ok, schemaVersion: 1 })))).toThrow(/schemaVersion/);
    expect(() => parseManifest(Buffer.from('[]'))).toThrow();
    expect(() => parseManifest(Buffer.from(JSON.stringify({ ...ok, config: { ...ok.config, size: -1 } })))).toThrow(/size/);
  });
});
