/**
 * Format v3 Gear images for end-to-end tests, until `gear convert
 * --format-version 3` is on this branch: `gear convert --format-version 2
 * --storage raw` into an OCI layout, then the index repacked as v3 (packs in
 * path order, pack-writer.ts) and pushed with its packs, a new config and
 * manifest to a real registry. `corrupt` paths get one byte of their stored
 * member flipped in the pack (the pack digest is that of the corrupt bytes, so
 * the registry serves them: only the member's content digest can catch it).
 *
 *   const img = await pushV3Image({ archive, work, registryHost: reg.host, location: { registry: proxy.host, repository }, tag: 'v3' });
 *   // img.ref (via location.registry), img.contents (path → bytes)
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import { Readable } from 'node:stream';
import { gunzipSync } from 'node:zlib';
import { readIndexLayer, writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { BlobLocation, IndexFile, IndexManifest } from '../../src/core/index/manifest.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { GEAR_CLI } from './dockerd.js';
import { buildPacks, sha256 } from './pack-writer.js';
import { runOk } from './proc.js';

export interface V3Image {
  /** location.registry/location.repository:tag */
  ref: string;
  /** path → content of every regular file with content */
  contents: Map<string, Buffer>;
  /** The v3 index manifest pushed. */
  index: IndexManifest;
  /** The pack blobs pushed (after corruption). */
  packs: Array<{ digest: string; size: number }>;
}

export async function pushV3Image(opts: {
  /** docker-archive of the source image */
  archive: string;
  work: string;
  /** where to push (the real registry) */
  registryHost: string;
  /** what the index names (e.g. a counting proxy in front of the registry) */
  location: BlobLocation;
  tag: string;
  corrupt?: string[];
  chunkAbove?: number;
}): Promise<V3Image> {
  const layout = await fs.mkdtemp(path.join(opts.work, 'layout-'));
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--no-progress', '--storage', 'raw', '--format-version', '2', '--location', `${opts.location.registry}/${opts.location.repository}`, `docker-archive:${opts.archive}`, `oci:${layout}`], { timeoutMs: 600_000 });
  const blob = (d: string) => path.join(layout, 'blobs/sha256', d.slice(7));
  const index = JSON.parse(await fs.readFile(path.join(layout, 'index.json'), 'utf8')) as { manifests: Array<{ digest: string }> };
  type Manifest = { config: { mediaType: string; digest: string }; layers: Array<{ digest: string; mediaType: string }> };
  let manifest: Manifest | undefined;
  for (const m of index.manifests) {
    const doc = JSON.parse(await fs.readFile(blob(m.digest), 'utf8')) as Manifest;
    if (doc.config?.mediaType === 'application/vnd.oci.image.config.v1+json') manifest = doc;
  }
  if (!manifest) throw new Error('no image manifest in the converted layout');
  const layer = manifest.layers[0]!;
  let tarBytes = await fs.readFile(blob(layer.digest));
  if (layer.mediaType.endsWith('gzip')) tarBytes = gunzipSync(tarBytes);
  const v2 = await readIndexLayer(Readable.from([tarBytes]));
  const files = v2.manifest.files;
  const bytes = await Promise.all(files.map((f) => fs.readFile(blob(f.digest))));
  const built = buildPacks(bytes, { chunkAbove: opts.chunkAbove ?? 4 << 20, chunkSize: 1 << 20 });
  for (const p of opts.corrupt ?? []) {
    const k = files.findIndex((f) => f.path === p);
    const m = built.files[k]?.member ?? built.files[k]?.chunks?.[0];
    if (!m) throw new Error(`corrupt: no file ${p}`);
    const pk = built.packs[m.pack]!;
    pk[m.offset + Math.floor(m.length / 2)] ^= 0x5a;
  }
  built.packRefs.splice(0, built.packRefs.length, ...built.packs.map((b) => ({ digest: sha256(b), size: b.length })));
  const v3files: IndexFile[] = files.map((f, k) => {
    const b = built.files[k]!;
    return b.member ? { path: f.path, digest: f.digest, size: f.size, member: b.member } : { path: f.path, digest: f.digest, size: f.size, chunkSize: b.chunkSize!, chunks: b.chunks! };
  });
  const v3: IndexManifest = { version: 3, location: opts.location, packs: built.packRefs, files: v3files };
  const parts: Buffer[] = [];
  for await (const c of writeIndexLayer(v3, v2.entries)) parts.push(c);
  const tar = Buffer.concat(parts);
  const cfg = JSON.parse(await fs.readFile(blob(manifest.config.digest), 'utf8')) as { rootfs: { diff_ids: string[] }; config?: { Labels?: Record<string, string> } };
  cfg.rootfs.diff_ids = [sha256(tar)];
  cfg.config ??= {};
  cfg.config.Labels = { ...(cfg.config.Labels ?? {}), 'io.gear.format.version': '3' };
  const cfgBytes = Buffer.from(JSON.stringify(cfg));
  const repo = `${opts.registryHost}/${opts.location.repository}`;
  const client = new RegistryClient();
  try {
    for (const p of built.packs) await client.pushBlob(repo, sha256(p), p);
    await client.pushBlob(repo, sha256(tar), tar);
    await client.pushBlob(repo, sha256(cfgBytes), cfgBytes);
    const m = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256(cfgBytes), size: cfgBytes.length },
        layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar', digest: sha256(tar), size: tar.length }],
      }),
    );
    await client.putManifest(`${repo}:${opts.tag}`, m);
  } finally {
    await client.close();
  }
  await fs.rm(layout, { recursive: true, force: true });
  return { ref: `${opts.location.registry}/${opts.location.repository}:${opts.tag}`, contents: new Map(files.map((f, k) => [f.path, bytes[k]!])), index: v3, packs: built.packRefs };
}
