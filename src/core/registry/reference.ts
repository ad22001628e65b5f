/**
 * Image references: `[registry/]repository[:tag][@sha256:…]`, with Docker's
 * defaults (no registry → docker.io, one-component repository on docker.io →
 * `library/…`, no tag and no digest → `latest`). Names are validated against
 * the distribution spec grammar so that nothing odd ends up in a URL path.
 *
 * https://github.com/distribution/reference/blob/main/reference.go (grammar)
 */
import { invalidArgument } from '../errors.js';
import { checkDigest } from './digest.js';

/** The host a reference without a registry part points to. */
export const DOCKER_HUB = 'docker.io';
/** Where docker.io's API actually lives. */
export const DOCKER_HUB_API_HOST = 'registry-1.docker.io';

/** A repository in a registry: the unit of authorization. */
export interface RepositoryRef {
  /** host[:port] as written by the user; `docker.io` for Docker Hub. */
  registry: string;
  /** Path components joined by `/`, e.g. `library/busybox`. */
  repository: string;
}

/** A manifest in a repository, by tag and/or digest (digest wins when both). */
export interface ImageReference extends RepositoryRef {
  tag?: string;
  digest?: string;
}

const COMPONENT_RE = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG_RE = /^[\w][\w.-]{0,127}$/;
const HOST_RE =
  /^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$/;
const MAX_NAME = 255;

export function isValidTag(tag: string): boolean {
  return TAG_RE.test(tag);
}

export function isValidRepository(repo: string): boolean {
  if (repo.length === 0 || repo.length > MAX_NAME) return false;
  return repo.split('/').every((c) => COMPONENT_RE.test(c));
}

export function isValidRegistryHost(host: string): boolean {
  if (!HOST_RE.test(host)) return false;
  const m = /:([0-9]+)$/.exec(host);
  return !m || (Number(m[1]) > 0 && Number(m[1]) < 65536);
}

export function checkTag(tag: string): string {
  if (!isValidTag(tag)) throw invalidArgument(`invalid tag ${JSON.stringify(tag.slice(0, 140))}`);
  return tag;
}

export function checkRepository(repo: string): string {
  if (!isValidRepository(repo)) {
    throw invalidArgument(
      `invalid repository name ${JSON.stringify(repo.slice(0, 300))}: ` +
        'want lowercase components [a-z0-9] separated by "/", with ".", "_", "__" or "-" inside',
    );
  }
  return repo;
}

/** Is the first path component a registry host (docker's rule: has "." or ":" or is "localhost")? */
function looksLikeHost(s: string): boolean {
  return s.includes('.') || s.includes(':') || s === 'localhost' || s.startsWith('[') || s !== s.toLowerCase();
}

function splitRegistry(name: string): { registry: string; path: string } {
  const slash = name.indexOf('/');
  if (slash > 0 && looksLikeHost(name.slice(0, slash))) {
    return { registry: name.slice(0, slash), path: name.slice(slash + 1) };
  }
  return { registry: DOCKER_HUB, path: name };
}

function normalizeRegistry(host: string): string {
  if (host === 'index.docker.io' || host === DOCKER_HUB_API_HOST) return DOCKER_HUB;
  return host;
}

/**
 * Parse `[registry/]repo` (no tag or digest). Throws InvalidArgument.
 */
export function parseRepository(s: string): RepositoryRef {
  if (typeof s !== 'string' || s.length === 0) throw invalidArgument('empty repository reference');
  if (s.includes('@')) {
    throw invalidArgument(`repository reference ${JSON.stringify(s.slice(0, 300))} must not have a digest`);
  }
  const { registry, path } = splitRegistry(s);
  if (path.includes(':')) throw invalidArgument(`repository reference ${JSON.stringify(s.slice(0, 300))} must not have a tag`);
  return finish(registry, path, s);
}

function finish(registryIn: string, path: string, orig: string): RepositoryRef {
  if (!isValidRegistryHost(registryIn)) {
    throw invalidArgument(`invalid registry host ${JSON.stringify(registryIn.slice(0, 260))} in ${JSON.stringify(orig.slice(0, 300))}`);
  }
  const registry = normalizeRegistry(registryIn);
  let repository = path;
  if (registry === DOCKER_HUB && !repository.includes('/')) repository = `library/${repository}`;
  checkRepository(repository);
  return { registry, repository };
}

/**
 * Parse an image reference: `localhost:5000/a/b:tag`, `busybox`,
 * `ghcr.io/x/y@sha256:…`, `x/y:tag@sha256:…`. Without tag and digest the tag
 * is `latest`. Throws InvalidArgument on anything malformed.
 */
export function parseReference(s: string): ImageReference {
  if (typeof s !== 'string' || s.length === 0) throw invalidArgument('empty image reference');
  if (s.length > 4096) throw invalidArgument('image reference too long');
  let rest = s;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = checkDigest(rest.slice(at + 1), `digest in reference ${JSON.stringify(s.slice(0, 300))}`);
    rest = rest.slice(0, at);
  }
  const { registry, path } = splitRegistry(rest);
  let repoPath = path;
  let tag: string | undefined;
  const colon = path.lastIndexOf(':');
  if (colon >= 0) {
    tag = checkTag(path.slice(colon + 1));
    repoPath = path.slice(0, colon);
  }
  const repo = finish(registry, repoPath, s);
  const ref: ImageReference = { ...repo };
  if (tag !== undefined) ref.tag = tag;
  if (digest !== undefined) ref.digest = digest;
  if (ref.tag === undefined && ref.digest === undefined) ref.tag = 'latest';
  return ref;
}

/** Format a reference in its fully-qualified form (`docker.io/library/x:tag`). */
export function formatReference(ref: ImageReference | RepositoryRef): string {
  let s = `${ref.registry}/${ref.repository}`;
  const r = ref as ImageReference;
  if (r.tag) s += `:${r.tag}`;
  if (r.digest) s += `@${r.digest}`;
  return s;
}

/** Accept a string or an already-parsed repository, validating the latter too. */
export function toRepositoryRef(r: string | RepositoryRef): RepositoryRef {
  if (typeof r === 'string') return parseRepository(r);
  return finish(r.registry, r.repository, `${r.registry}/${r.repository}`);
}

/** Accept a string or an already-parsed reference, validating the latter too. */
export function toImageReference(r: string | ImageReference): ImageReference {
  if (typeof r === 'string') return parseReference(r);
  const repo = toRepositoryRef(r);
  const out: ImageReference = { ...repo };
  if (r.tag !== undefined) out.tag = checkTag(r.tag);
  if (r.digest !== undefined) out.digest = checkDigest(r.digest);
  if (out.tag === undefined && out.digest === undefined) throw invalidArgument(`reference ${formatReference(repo)} has neither tag nor digest`);
  return out;
}
