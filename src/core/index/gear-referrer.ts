/**
 * Finding the Gear index attached to an ordinary image (`gear convert
 * --attach`, docs/format.md §9) and fetching it, for a node that was asked
 * for the *original* image and wants to serve it lazily.
 *
 * Everything here comes from the registry and is checked before use:
 * - the source manifest is fetched by its digest (verified), its config by
 *   its descriptor (verified), and its diff_ids give the chain IDs;
 * - each candidate referrer is fetched by its digest and must name the
 *   source manifest as `subject`, carry the Gear artifactType, have exactly
 *   one gzip tar layer, and a config (verified) whose one diff_id is that
 *   layer's and whose `io.gear.source.digest` label is the source manifest;
 * - the index blob is fetched verified against the layer digest and size,
 *   and its uncompressed bytes against the config's diff_id.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { Writable } from 'node:stream';
import { invalidArgument } from '../errors.js';
import type { RegistryClient } from '../registry/client.js';
import { isDigest, sha256Digest } from '../registry/digest.js';
import { isImageManifestMediaType, type Descriptor, type ImageManifest } from '../registry/media-types.js';
import { findReferrers } from '../registry/referrers.js';
import { formatReference, toRepositoryRef, type RepositoryRef } from '../registry/reference.js';
import { GearMediaType, SOURCE_DIGEST_LABEL } from './manifest.js';

/** Gear referrers tried at most per image. */
const MAX_CANDIDATES = 8;
/** Largest image config accepted. */
const MAX_CONFIG_BYTES = 8 << 20;
/** Largest index layer blob accepted (a v2 index manifest is capped at 256 MiB uncompressed). */
export const MAX_INDEX_BLOB_BYTES = 256 << 20;
/** Layers an image may have (containerd and Docker stop far below). */
const MAX_LAYERS = 1000;

const GZIP_LAYER_TYPES = ['application/vnd.oci.image.layer.v1.tar+gzip', 'application/vnd.docker.image.rootfs.diff.tar.gzip'];

/** containerd's chain IDs (identity.ChainIDs): chain[0] = diff[0], chain[i] = sha256(chain[i-1] + " " + diff[i]). */
export function chainIds(diffIds: readonly string[]): string[] {
  const out: string[] = [];
  for (const d of diffIds) out.push(out.length === 0 ? d : sha256Digest(`${out[out.length - 1]} ${d}`));
  return out;
}

export interface GearReferrer {
  /** The source image: its repository, manifest digest, layer descriptors and chain IDs. */
  repository: RepositoryRef;
  sourceManifest: string;
  sourceLayers: Descriptor[];
  sourceChainIds: string[];
  /** The attached Gear image manifest and its index layer. */
  gearManifest: string;
  index: { digest: string; size: number; diffId: string };
}

function diffIdsOf(config: Buffer, what: string): string[] {
  let doc: unknown;
  try {
    doc = JSON.parse(config.toString('utf8'));
  } catch (err) {
    throw invalidArgument(`${what}: config is not JSON`, err);
  }
  const ids = (doc as { rootfs?: { diff_ids?: unknown } })?.rootfs?.diff_ids;
  if (!Array.isArray(ids) || ids.length > MAX_LAYERS || !ids.every(isDigest)) throw invalidArgument(`${what}: config has no valid rootfs.diff_ids`);
  return ids as string[];
}

function labelsOf(config: Buffer): Record<string, unknown> {
  const doc = JSON.parse(config.toString('utf8')) as { config?: { Labels?: unknown } };
  const l = doc?.config?.Labels;
  return l && typeof l === 'object' ? (l as Record<string, unknown>) : {};
}

/**
 * The Gear index attached to the image manifest `manifestDigest` of `repo`,
 * or undefined when none is (or none passes the checks; `onReject` hears why).
 * Registry failures reject.
 */
export async function findGearReferrer(
  client: RegistryClient,
  repoLike: string | RepositoryRef,
  manifestDigest: string,
  opts: { signal?: AbortSignal; onReject?: (digest: string, why: string) => void } = {},
): Promise<GearReferrer | undefined> {
  if (!isDigest(manifestDigest)) throw invalidArgument(`not a sha256 manifest digest: ${String(manifestDigest).slice(0, 80)}`);
  const repo = toRepositoryRef(repoLike);
  const name = formatReference(repo);
  const rOpts = opts.signal ? { signal: opts.signal } : {};
  const { referrers } = await findReferrers(client, repo, manifestDigest, { ...rOpts, artifactType: GearMediaType.IndexReferrer });
  if (referrers.length === 0) return undefined;

  const src = await client.getManifest(`${name}@${manifestDigest}`, rOpts);
  if (!isImageManifestMediaType(src.mediaType)) throw invalidArgument(`${name}@${manifestDigest} is not an image manifest`);
  const srcManifest = src.manifest as ImageManifest;
  if (srcManifest.layers.length === 0 || srcManifest.layers.length > MAX_LAYERS) throw invalidArgument(`${name}@${manifestDigest}: ${srcManifest.layers.length} layers`);
  const srcConfig = await client.fetchBlob(repo, srcManifest.config.digest, { ...rOpts, expectedSize: srcManifest.config.size, maxBytes: MAX_CONFIG_BYTES });
  const diffIds = diffIdsOf(srcConfig, `${name}@${manifestDigest}`);
  if (diffIds.length !== srcManifest.layers.length) throw invalidArgument(`${name}@${manifestDigest}: ${srcManifest.layers.length} layers but ${diffIds.length} diff_ids`);

  const reject = opts.onReject ?? (() => undefined);
  for (const d of referrers.slice(0, MAX_CANDIDATES)) {
    const g = await client.getManifest(`${name}@${d.digest}`, rOpts);
    const m = g.manifest as ImageManifest;
    if (!isImageManifestMediaType(g.mediaType)) {
      reject(d.digest, 'not an image manifest');
      continue;
    }
    if (m.subject?.digest !== manifestDigest) {
      reject(d.digest, `its subject is ${String(m.subject?.digest)}, not the image`);
      continue;
    }
    if (m.artifactType !== GearMediaType.IndexReferrer) {
      reject(d.digest, `artifactType ${String(m.artifactType)}`);
      continue;
    }
    const layer = m.layers[0];
    if (m.layers.length !== 1 || !layer || !GZIP_LAYER_TYPES.includes(layer.mediaType) || layer.size > MAX_INDEX_BLOB_BYTES) {
      reject(d.digest, 'not one gzip index layer of an acceptable size');
      continue;
    }
    const cfg = await client.fetchBlob(repo, m.config.digest, { ...rOpts, expectedSize: m.config.size, maxBytes: MAX_CONFIG_BYTES });
    const ids = diffIdsOf(cfg, `${name}@${d.digest}`);
    if (ids.length !== 1) {
      reject(d.digest, `its config has ${ids.length} diff_ids`);
      continue;
    }
    if (labelsOf(cfg)[SOURCE_DIGEST_LABEL] !== manifestDigest) {
      reject(d.digest, `its ${SOURCE_DIGEST_LABEL} label does not name the image`);
      continue;
    }
    return {
      repository: repo,
      sourceManifest: manifestDigest,
      sourceLayers: srcManifest.layers,
      sourceChainIds: chainIds(diffIds),
      gearManifest: g.digest,
      index: { digest: layer.digest, size: layer.size, diffId: ids[0]! },
    };
  }
  return undefined;
}

/**
 * Downloads the index layer blob of `ref` to `dest`, verified against its
 * digest and size, then checks its uncompressed bytes against the diff_id.
 */
export async function fetchGearIndexBlob(client: RegistryClient, ref: GearReferrer, dest: string, signal?: AbortSignal): Promise<void> {
  await client.fetchBlobVerified(ref.repository, ref.index.digest, dest, { expectedSize: ref.index.size, ...(signal ? { signal } : {}) });
  const h = createHash('sha256');
  let n = 0;
  await pipeline(
    createReadStream(dest),
    createGunzip(),
    new Writable({
      write(chunk: Buffer, _e, cb) {
        n += chunk.length;
        if (n > 2 * MAX_INDEX_BLOB_BYTES) return cb(invalidArgument(`index layer ${ref.index.digest}: uncompressed beyond ${2 * MAX_INDEX_BLOB_BYTES} bytes`));
        h.update(chunk);
        cb();
      },
    }),
  );
  const got = `sha256:${h.digest('hex')}`;
  if (got !== ref.index.diffId) throw invalidArgument(`index layer ${ref.index.digest}: uncompressed digest ${got}, its config says ${ref.index.diffId}`);
}
