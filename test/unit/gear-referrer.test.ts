/**
 * Finding an attached Gear index (core/registry/referrers.ts,
 * core/index/gear-referrer.ts) against a small fake registry: the referrers
 * API path (Debian's docker-registry 2.8, used by the integration tests, has
 * none), the referrers tag fallback, and every check a hostile referrer must
 * pass (subject, artifactType, one layer, config label, digests, diff_id).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { chainIds, fetchGearIndexBlob, findGearReferrer } from '../../src/core/index/gear-referrer.js';
import { GearMediaType } from '../../src/core/index/manifest.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { findReferrers, referrersTag } from '../../src/core/registry/referrers.js';

const sha = (b: Buffer | string) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
const OCI_MANIFEST = 'application/vnd.oci.image.manifest.v1+json';
const OCI_INDEX = 'application/vnd.oci.image.index.v1+json';

/** A fake registry: blobs and manifests by digest, tags, and a switchable referrers API. */
const blobs = new Map<string, Buffer>();
const manifests = new Map<string, { bytes: Buffer; type: string }>();
const requests: string[] = [];
let referrersApi: ((digest: string) => Buffer) | undefined;
let server: Server;
let host = '';
let client: RegistryClient;

function putBlob(b: Buffer): { digest: string; size: number } {
  blobs.set(sha(b), b);
  return { digest: sha(b), size: b.length };
}
function putManifest(doc: object, tag?: string, type = OCI_MANIFEST): { digest: string; size: number; bytes: Buffer } {
  const bytes = Buffer.from(JSON.stringify(doc));
  manifests.set(sha(bytes), { bytes, type });
  if (tag) manifests.set(tag, { bytes, type });
  return { digest: sha(bytes), size: bytes.length, bytes };
}

interface World {
  source: { digest: string; size: number };
  diffIds: string[];
  index: Buffer;
  indexDiffId: string;
}

/** An ordinary two-layer image and a Gear image that points at it, built with `tweak` applied to the Gear manifest/config. */
function world(tweak: { manifest?: (m: Record<string, unknown>) => void; sourceLabel?: string; diffId?: string } = {}): World & { gear: { digest: string; size: number } } {
  const l1 = Buffer.from('layer one tar');
  const l2 = Buffer.from('layer two tar');
  const diffIds = [sha(l1), sha(l2)];
  const cfg = putBlob(Buffer.from(JSON.stringify({ rootfs: { type: 'layers', diff_ids: diffIds } })));
  const layers = [l1, l2].map((l) => ({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...putBlob(gzipSync(l)) }));
  const source = putManifest({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...cfg }, layers }, 'app:1');
  const indexTar = Buffer.from('index layer tar bytes');
  const index = gzipSync(indexTar);
  const indexDiffId = tweak.diffId ?? sha(indexTar);
  const gcfg = putBlob(
    Buffer.from(JSON.stringify({ rootfs: { type: 'layers', diff_ids: [indexDiffId] }, config: { Labels: { 'io.gear.source.digest': tweak.sourceLabel ?? source.digest } } })),
  );
  const m: Record<string, unknown> = {
    schemaVersion: 2,
    mediaType: OCI_MANIFEST,
    artifactType: GearMediaType.IndexReferrer,
    config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...gcfg },
    layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...putBlob(index) }],
    subject: { mediaType: OCI_MANIFEST, digest: source.digest, size: source.size },
  };
  tweak.manifest?.(m);
  const gear = putManifest(m);
  return { source, diffIds, index, indexDiffId, gear };
}

function listAsTag(source: string, gear: { digest: string; size: number }, artifactType: string = GearMediaType.IndexReferrer): void {
  putManifest({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [{ mediaType: OCI_MANIFEST, ...gear, artifactType }] }, referrersTag(source), OCI_INDEX);
}

beforeAll(async () => {
  server = createServer((req, res) => {
    requests.push(`${req.method} ${req.url}`);
    const url = new URL(req.url ?? '/', 'http://x');
    let m: RegExpExecArray | null;
    if (url.pathname === '/v2/') return res.writeHead(200).end('{}');
    if ((m = /^\/v2\/app\/referrers\/(sha256:[a-f0-9]{64})$/.exec(url.pathname))) {
      if (!referrersApi) return res.writeHead(404, { 'content-type': 'text/plain' }).end('404 page not found');
      const body = referrersApi(m[1]!);
      return res.writeHead(200, { 'content-type': OCI_INDEX, 'content-length': body.length }).end(body);
    }
    if ((m = /^\/v2\/app\/manifests\/(.+)$/.exec(url.pathname))) {
      const got = manifests.get(m[1]!.startsWith('sha256:') ? m[1]! : `app:${m[1]}`) ?? manifests.get(m[1]!);
      if (!got) return res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN"}]}');
      res.writeHead(200, { 'content-type': got.type, 'content-length': got.bytes.length, 'docker-content-digest': sha(got.bytes) });
      return res.end(req.method === 'HEAD' ? undefined : got.bytes);
    }
    if ((m = /^\/v2\/app\/blobs\/(sha256:[a-f0-9]{64})$/.exec(url.pathname))) {
      const b = blobs.get(m[1]!);
      if (!b) return res.writeHead(404).end();
      res.writeHead(200, { 'content-length': b.length, 'content-type': 'application/octet-stream' });
      return res.end(req.method === 'HEAD' ? undefined : b);
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  host = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  client = new RegistryClient({ retry: { maxAttempts: 1 } });
});

afterAll(async () => {
  await client?.close();
  await new Promise<void>((r) => server.close(() => r()));
});

beforeEach(() => {
  blobs.clear();
  manifests.clear();
  requests.length = 0;
  referrersApi = undefined;
});

describe('referrers: API first, then the tag schema', () => {
  it('uses the referrers API where the registry has it (and filters by artifactType itself)', async () => {
    const w = world();
    referrersApi = (d) =>
      Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: OCI_INDEX,
          manifests: d === w.source.digest ? [{ mediaType: OCI_MANIFEST, digest: sha('other'), size: 5, artifactType: 'application/x-sbom' }, { mediaType: OCI_MANIFEST, ...w.gear, artifactType: GearMediaType.IndexReferrer }] : [],
        }),
      );
    const r = await findReferrers(client, `${host}/app`, w.source.digest, { artifactType: GearMediaType.IndexReferrer });
    expect(r.source).toBe('api');
    expect(r.referrers.map((d) => d.digest)).toEqual([w.gear.digest]);
    expect(requests.some((l) => l.startsWith(`GET /v2/app/referrers/${w.source.digest}?artifactType=`))).toBe(true);
    expect(requests.some((l) => l.includes(referrersTag(w.source.digest)))).toBe(false);
    const found = await findGearReferrer(client, `${host}/app`, w.source.digest);
    expect(found?.gearManifest).toBe(w.gear.digest);
  });

  it('falls back to the sha256-<hex> tag when the API answers 404, and finds nothing without the tag', async () => {
    const w = world();
    expect(await findReferrers(client, `${host}/app`, w.source.digest)).toEqual({ referrers: [], source: 'none' });
    expect(await findGearReferrer(client, `${host}/app`, w.source.digest)).toBeUndefined();
    listAsTag(w.source.digest, w.gear);
    const r = await findReferrers(client, `${host}/app`, w.source.digest, { artifactType: GearMediaType.IndexReferrer });
    expect(r.source).toBe('tag');
    expect(r.referrers.map((d) => d.digest)).toEqual([w.gear.digest]);
  });
});

describe('findGearReferrer: a referrer is used only when every check passes', () => {
  it('accepts a good one: chain IDs of the source, the index layer and its diff_id', async () => {
    const w = world();
    listAsTag(w.source.digest, w.gear);
    const g = await findGearReferrer(client, `${host}/app`, w.source.digest);
    expect(g).toBeDefined();
    expect(g!.sourceChainIds).toEqual([w.diffIds[0], sha(`${w.diffIds[0]} ${w.diffIds[1]}`)]);
    expect(g!.sourceChainIds).toEqual(chainIds(w.diffIds));
    expect(g!.index).toEqual({ digest: sha(w.index), size: w.index.length, diffId: w.indexDiffId });
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-referrer-'));
    try {
      await fetchGearIndexBlob(client, g!, path.join(dir, 'index.tar.gz'));
      expect(await fs.readFile(path.join(dir, 'index.tar.gz'))).toEqual(w.index);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  const bad: Array<[string, Parameters<typeof world>[0]]> = [
    ['its subject is another manifest', { manifest: (m) => ((m.subject as { digest: string }).digest = sha('another')) }],
    ['it has no Gear artifactType', { manifest: (m) => delete m.artifactType }],
    ['it has two layers', { manifest: (m) => (m.layers = [...(m.layers as unknown[]), ...(m.layers as unknown[])]) }],
    ['its layer is not a gzip tar', { manifest: (m) => ((m.layers as { mediaType: string }[])[0]!.mediaType = 'application/vnd.oci.image.layer.v1.tar+zstd') }],
    ['its config names another source image', { sourceLabel: sha('some other image') }],
  ];
  for (const [why, tweak] of bad) {
    it(`ignores a referrer when ${why}`, async () => {
      const w = world(tweak);
      listAsTag(w.source.digest, w.gear);
      const rejected: string[] = [];
      expect(await findGearReferrer(client, `${host}/app`, w.source.digest, { onReject: (d) => rejected.push(d) })).toBeUndefined();
      expect(rejected).toEqual([w.gear.digest]);
    });
  }

  it('a referrer listed under a digest whose manifest has other bytes is an error (verified by digest)', async () => {
    const w = world();
    const fake = { digest: sha('not the manifest'), size: 10 };
    manifests.set(fake.digest, { bytes: manifests.get(w.gear.digest)!.bytes, type: OCI_MANIFEST });
    listAsTag(w.source.digest, fake);
    await expect(findGearReferrer(client, `${host}/app`, w.source.digest)).rejects.toThrow(/digest/);
  });

  it('refuses an index blob whose uncompressed bytes are not the config diff_id', async () => {
    const w = world({ diffId: sha('something else') });
    listAsTag(w.source.digest, w.gear);
    const g = await findGearReferrer(client, `${host}/app`, w.source.digest);
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-referrer-'));
    try {
      await expect(fetchGearIndexBlob(client, g!, path.join(dir, 'i'))).rejects.toThrow(/uncompressed digest/);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
