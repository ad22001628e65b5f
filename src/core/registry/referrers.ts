/**
 * OCI 1.1 referrers: the manifests whose `subject` names a given manifest.
 *
 * Two places hold them (image-spec/distribution-spec 1.1):
 * - the referrers API, `GET /v2/<name>/referrers/<digest>`, on registries
 *   that have it (it answers an OCI image index, also for no referrers);
 * - the referrers tag schema otherwise: tag `sha256-<hex>` holds an OCI image
 *   index whose `manifests` are the referrers, kept by their pushers with a
 *   read-modify-write (distribution 2.8, Debian's docker-registry, has no API).
 *
 * Both lists come from the registry and are not authenticated by any digest:
 * callers verify each referrer manifest they fetch (by its digest) and check
 * its `subject` themselves.
 */
import type { RegistryClient } from './client.js';
import { isDigest } from './digest.js';
import { isIndexMediaType, type Descriptor, type ImageIndex } from './media-types.js';
import type { RepoLike, RequestOptions } from './types.js';
import { formatReference, toRepositoryRef } from './reference.js';

/** Referrers considered at most (a hostile index could list millions). */
export const MAX_REFERRERS = 1000;

/** The referrers tag of a manifest digest: `sha256-<hex>`. */
export function referrersTag(digest: string): string {
  if (!isDigest(digest)) throw new Error(`not a sha256 digest: ${digest}`);
  return `sha256-${digest.slice('sha256:'.length)}`;
}

export interface ReferrersResult {
  /** Descriptors of referrers (filtered by artifactType when one was asked), at most MAX_REFERRERS. */
  referrers: Descriptor[];
  /** Where they came from. */
  source: 'api' | 'tag' | 'none';
}

function filtered(index: ImageIndex | undefined, artifactType: string | undefined): Descriptor[] {
  const all = Array.isArray(index?.manifests) ? index.manifests.slice(0, MAX_REFERRERS) : [];
  return all.filter((d) => d && isDigest(d.digest) && (!artifactType || d.artifactType === artifactType));
}

/**
 * The referrers of `subject` in `repo`: through the referrers API when the
 * registry has it, else through the referrers tag. A missing tag is no referrers.
 */
export async function findReferrers(
  client: RegistryClient,
  repoLike: RepoLike,
  subject: string,
  opts: RequestOptions & { artifactType?: string } = {},
): Promise<ReferrersResult> {
  const repo = toRepositoryRef(repoLike);
  const api = await client.getReferrers(repo, subject, opts);
  if (api) return { referrers: filtered(api, opts.artifactType), source: 'api' };
  const ref = `${formatReference(repo)}:${referrersTag(subject)}`;
  const got = await client.getManifest(ref, opts).catch((err: unknown) => {
    if ((err as { class?: string })?.class === 'NotFound') return undefined;
    throw err;
  });
  if (!got) return { referrers: [], source: 'none' };
  if (!isIndexMediaType(got.mediaType)) return { referrers: [], source: 'none' };
  return { referrers: filtered(got.manifest as ImageIndex, opts.artifactType), source: 'tag' };
}
