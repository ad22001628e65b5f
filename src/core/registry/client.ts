/**
 * RegistryClient: an OCI distribution client (undici) for `gear convert`
 * (uploads) and the lazy fetcher (downloads).
 *
 * Usage:
 * ```ts
 * const client = new RegistryClient({ insecureRegistries: ['reg.lan:5000'] });
 * try {
 *   // download
 *   const img = await client.resolveImage('localhost:5000/app:1');   // index → host platform
 *   const cfg = await client.fetchBlob('localhost:5000/app', img.manifest.config.digest);
 *   await client.fetchBlobVerified('localhost:5000/app', digest, '/pool/.staging/x'); // sha256-checked
 *   const { stream } = await client.openBlob('localhost:5000/app', digest, { range: { start: 0, end: 4095 } });
 *   // upload
 *   await client.pushBlob('localhost:5000/app', digest, fileBlobSource(path, size), { mountFrom: ['localhost:5000/other'] });
 *   const { digest: m } = await client.putManifest('localhost:5000/app:1', manifestBytes);
 * } finally {
 *   await client.close();
 * }
 * ```
 * Errors are GearErrors: NotFound (404 manifest/blob), PermissionDenied
 * (401/403; the message names the registry and how to log in), Unavailable
 * (network or 5xx after bounded retries; DigestMismatchError for bad bytes),
 * DeadlineExceeded (timeouts), InvalidArgument (bad reference, digest or
 * manifest). Every method takes an AbortSignal; aborting rejects with the
 * signal's reason. Safe to use concurrently; one client per process is enough.
 *
 * Security: every digest is validated before it reaches a URL or path;
 * credentials go only to the registry they belong to (and the token realm it
 * names), never to a redirect target on another origin; http:// only for
 * loopback or listed insecure registries; manifests are size-capped and
 * verified against the digest they were fetched by.
 */
import { createReadStream } from 'node:fs';
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { Readable, Transform, type TransformCallback } from 'node:stream';
import { GearError, invalidArgument, notFound, unavailable } from '../errors.js';
import { repositoryScope } from './auth.js';
import { checkDigest, DigestMismatchError, DigestVerifier, sha256Digest } from './digest.js';
import { MANIFEST_ACCEPT, isImageManifestMediaType, isIndexMediaType, parseManifest, type ImageIndex, type ImageManifest } from './media-types.js';
import { formatPlatform, hostPlatform, selectPlatformManifest } from './platform.js';
import { formatReference, toImageReference, toRepositoryRef, type ImageReference, type RepositoryRef } from './reference.js';
import { isRetryableNetworkError, nextRetryDelay, sleep } from './retry.js';
import { HostsConfig } from './hosts.js';
import { MirrorRouter, type HostRoute, type RouteCounters } from './mirrors.js';
import { header, readCapped, RegistryTransport, type RequestBody, type SendRequest, type SendResponse } from './transport.js';
import type {
  BlobInfo,
  BlobSource,
  BlobStream,
  FetchVerifiedOptions,
  ManifestResult,
  OpenBlobOptions,
  PushBlobOptions,
  PushBlobResult,
  PutManifestOptions,
  RefLike,
  RegistryClientOptions,
  RepoLike,
  RequestOptions,
  ResolveOptions,
  ResolvedImage,
} from './types.js';

export type * from './types.js';

const DEFAULT_MAX_MANIFEST = 4 << 20;
const MAX_ERROR_BODY = 64 << 10;
const MAX_TAG_PAGES = 100;

/** A BlobSource reading [start, end) of a file; re-openable for retries and chunks. */
export function fileBlobSource(path: string, size: number): BlobSource {
  return {
    size,
    open: (start: number, end: number): Readable =>
      end > start ? createReadStream(path, { start, end: end - 1 }) : Readable.from([]),
  };
}

function sourceSize(src: BlobSource): number {
  return src instanceof Uint8Array ? src.length : src.size;
}

async function openSource(src: BlobSource, start: number, end: number): Promise<RequestBody> {
  if (src instanceof Uint8Array) return Buffer.from(src.buffer, src.byteOffset + start, end - start);
  const s = await src.open(start, end);
  return s instanceof Readable ? s : Readable.from(s);
}

/** The registry's error text from a JSON error body (`{"errors":[{code,message}]}`), capped. */
async function errorDetail(res: SendResponse): Promise<string> {
  try {
    const text = (await readCapped(res.body, MAX_ERROR_BODY, 'error body')).toString('utf8');
    const doc = JSON.parse(text) as { errors?: Array<{ code?: unknown; message?: unknown }> };
    if (Array.isArray(doc.errors)) {
      return doc.errors
        .slice(0, 5)
        .map((e) => [e.code, e.message].filter((x) => typeof x === 'string').join(': '))
        .join('; ')
        .slice(0, 500);
    }
  } catch {
    // not JSON, or unreadable: the status alone will do
  }
  return '';
}

async function statusError(res: SendResponse, what: string): Promise<GearError> {
  const detail = await errorDetail(res);
  const msg = `${what}: registry answered ${res.status}${detail ? ` (${detail})` : ''}`;
  if (res.status === 404) return notFound(msg);
  if (res.status === 400 || res.status === 405 || res.status === 413 || res.status === 416) return invalidArgument(msg);
  return unavailable(msg);
}

/**
 * Trims a body to [skip, skip+length) and fails if it ends short (truncation)
 * or runs longer than `total`, the whole body's expected length (-1: unknown;
 * a range served from a full 200 body is shorter than that body).
 */
class ExactLength extends Transform {
  private seen = 0;
  constructor(
    private readonly skip: number,
    private readonly length: number,
    readonly what: string,
    private readonly total = skip === 0 ? length : -1,
  ) {
    super();
  }
  /** Body bytes seen so far. */
  get bytes(): number {
    return this.seen;
  }
  override _transform(chunk: Buffer, _e: BufferEncoding, cb: TransformCallback): void {
    const from = this.seen;
    this.seen += chunk.length;
    const lo = Math.max(0, this.skip - from);
    const hi = this.length < 0 ? chunk.length : Math.min(chunk.length, this.skip + this.length - from);
    if (this.total >= 0 && this.seen > this.total) {
      cb(unavailable(`${this.what}: body longer than the declared ${this.total} bytes`));
      return;
    }
    if (hi > lo) this.push(chunk.subarray(lo, hi));
    cb();
  }
  override _flush(cb: TransformCallback): void {
    if (this.length >= 0 && this.seen < this.skip + this.length) {
      cb(unavailable(`${this.what}: body ended after ${Math.max(0, this.seen - this.skip)} of ${this.length} bytes`));
      return;
    }
    cb();
  }
}

/** A response body that broke mid-way (reset, early close, idle timeout): worth a retry. */
export class BrokenBodyError extends GearError {
  constructor(message: string, cause: unknown) {
    super('Unavailable', message, { cause });
    this.name = 'BrokenBodyError';
  }
}

/**
 * The body of a blob response through `checker`. A body can break (reset,
 * early close, timeout) at any moment, also before the caller attached its
 * consumer (while it opens a pool file, say): the error then stays on the
 * stream (`stream.errored`), and the consumer's pipeline or `for await` gets
 * it, but it is never emitted to nobody (an uncaught exception that would take
 * the daemon down). The error is an Unavailable naming the blob; the network
 * error is its cause (so retry classification still sees the code).
 */
function bodyStream(res: SendResponse, checker: ExactLength, what = checker.what): Readable {
  const stream = res.body.pipe(checker);
  stream.on('error', () => undefined);
  res.body.on('error', (e) => {
    stream.destroy(e instanceof GearError ? e : new BrokenBodyError(`${what}: the body broke after ${checker.bytes} bytes: ${(e as Error)?.message ?? String(e)}`, e));
  });
  // The consumer gave up: let go of the connection too.
  stream.on('close', () => {
    if (!res.body.destroyed && !res.body.readableEnded) res.body.destroy();
  });
  return stream;
}

function contentLength(res: SendResponse): number | undefined {
  const v = header(res.headers, 'content-length');
  if (v === undefined || !/^[0-9]{1,15}$/.test(v)) return undefined;
  return Number(v);
}

/** How one pull request reaches its registry: the registry itself, or a mirror (mirrors.ts). */
interface Via {
  /** Key of credentials and tokens. */
  registry: string;
  base?: URL;
  tls?: { ca: string[]; skipVerify: boolean };
  headers: Record<string, string>;
  path(apiPath: string): string;
  route?: HostRoute;
}

function originVia(registry: string): Via {
  return { registry, headers: {}, path: (p) => `/v2${p}` };
}

function viaOf(route: HostRoute): Via {
  const h = route.host;
  const headers: Record<string, string> = {};
  for (const [k, v] of Object.entries(h.headers)) headers[k] = v.join(', ');
  const via: Via = { registry: route.authKey, base: route.base, headers, path: (p) => route.path(p), route };
  if (h.skipVerify || h.ca.length) via.tls = { ca: h.ca, skipVerify: h.skipVerify };
  return via;
}

export class RegistryClient {
  private readonly transport: RegistryTransport;
  /** Mirror failover, when mirrors may be configured (a hosts.toml directory or Docker Hub mirrors). */
  private readonly router: MirrorRouter | undefined;

  constructor(readonly options: RegistryClientOptions = {}) {
    this.transport = new RegistryTransport(options);
    const m = options.mirrors;
    if (m && (m.configDir || m.dockerHubMirrors?.length)) {
      const hosts = new HostsConfig({
        configDir: m.configDir,
        dockerHubMirrors: m.dockerHubMirrors,
        allowsHttp: (h) => this.transport.allowsHttp(h),
      });
      this.router = new MirrorRouter(hosts, m.mirrorTimeoutMs !== undefined ? { mirrorTimeoutMs: m.mirrorTimeoutMs } : {});
    }
  }

  /** Counts of pull requests by host role (mirror, origin) and outcome; undefined without mirrors. */
  routeCounters(): RouteCounters | undefined {
    return this.router?.counters;
  }

  /** The mirror router (tests and status). */
  get mirrorRouter(): MirrorRouter | undefined {
    return this.router;
  }

  /**
   * Run one pull request on the registry's hosts: mirrors in order, then the
   * registry (mirrors.ts); without mirrors, on the registry alone.
   * `answered()` tells the router that the host's headers arrived.
   */
  private pull<T>(
    registry: string,
    capability: 'pull' | 'resolve',
    signal: AbortSignal | undefined,
    what: string,
    noMirrors: boolean | undefined,
    attempt: (via: Via, signal: AbortSignal | undefined, answered: () => void) => Promise<T>,
  ): Promise<T> {
    if (!this.router || noMirrors) return attempt(originVia(registry), signal, () => undefined);
    return this.router.run(registry, capability, signal, what, (route, s, answered) => attempt(viaOf(route), s, answered));
  }

  private viaRequest(via: Via): Pick<SendRequest, 'registry' | 'base' | 'tls' | 'noRetry'> {
    const r: Pick<SendRequest, 'registry' | 'base' | 'tls' | 'noRetry'> = { registry: via.registry };
    if (via.base) r.base = via.base;
    if (via.tls) r.tls = via.tls;
    // A mirror gets one attempt: the next host is the retry.
    if (via.route?.role === 'mirror') r.noRetry = true;
    return r;
  }

  private get maxManifest(): number {
    return this.options.maxManifestBytes ?? DEFAULT_MAX_MANIFEST;
  }

  private send(req: SendRequest): Promise<SendResponse> {
    return this.transport.send(req);
  }

  /**
   * Run a whole operation (request + reading its body) again on retryable
   * network errors that happen while reading the body, within the retry policy.
   */
  private async retryBody<T>(what: string, signal: AbortSignal | undefined, op: () => Promise<T>): Promise<T> {
    const started = Date.now();
    for (let n = 1; ; n++) {
      try {
        return await op();
      } catch (err) {
        const broken = err instanceof BrokenBodyError || (!(err instanceof GearError) && isRetryableNetworkError(err));
        if (signal?.aborted || !broken) {
          if (err instanceof GearError || signal?.aborted) throw err;
          throw unavailable(`${what}: ${(err as Error)?.message ?? String(err)}`, err);
        }
        const delay = nextRetryDelay(n, Date.now() - started, this.transport.retry);
        if (delay === undefined) throw unavailable(`${what}: ${(err as Error).message} (gave up after ${n} attempts)`, err);
        await sleep(delay, signal);
      }
    }
  }

  private manifestPath(ref: ImageReference): string {
    return `/v2/${ref.repository}/manifests/${ref.digest ?? ref.tag}`;
  }

  async getManifest(refLike: RefLike, opts: RequestOptions = {}): Promise<ManifestResult> {
    const ref = toImageReference(refLike);
    const what = `GET manifest ${formatReference(ref)}`;
    return this.retryBody(what, opts.signal, () => this.pull(ref.registry, ref.digest ? 'pull' : 'resolve', opts.signal, what, opts.noMirrors, async (via, signal, answered) => {
      const res = await this.send({
        ...this.viaRequest(via),
        scopes: [repositoryScope(ref.repository, false)],
        method: 'GET',
        url: via.path(this.manifestPath(ref).slice(3)),
        headers: { ...via.headers, accept: MANIFEST_ACCEPT.join(', ') },
        signal,
        followRedirects: true,
        what,
      });
      answered();
      if (res.status !== 200) throw await statusError(res, what);
      const len = contentLength(res);
      if (len !== undefined && len > this.maxManifest) {
        res.body.destroy();
        throw unavailable(`${what}: manifest of ${len} bytes exceeds the ${this.maxManifest} byte limit`);
      }
      const bytes = await readCapped(res.body, this.maxManifest, what);
      if (len !== undefined && bytes.length !== len) throw unavailable(`${what}: got ${bytes.length} of ${len} bytes`);
      const digest = sha256Digest(bytes);
      if (ref.digest && digest !== ref.digest) {
        throw new DigestMismatchError(`${what}: content has digest ${digest}`, ref.digest, digest);
      }
      const claimed = header(res.headers, 'docker-content-digest');
      if (claimed && claimed.startsWith('sha256:') && claimed !== digest) {
        throw new DigestMismatchError(`${what}: registry claims ${claimed.slice(0, 80)} but content has ${digest}`, claimed, digest);
      }
      const parsed = parseManifest(bytes, header(res.headers, 'content-type'));
      return { digest, mediaType: parsed.mediaType, size: bytes.length, bytes, manifest: parsed.manifest };
    }));
  }

  async headManifest(refLike: RefLike, opts: RequestOptions = {}): Promise<BlobInfo | undefined> {
    const ref = toImageReference(refLike);
    const what = `HEAD manifest ${formatReference(ref)}`;
    const res = await this.send({
      registry: ref.registry,
      scopes: [repositoryScope(ref.repository, false)],
      method: 'HEAD',
      url: this.manifestPath(ref),
      headers: { accept: MANIFEST_ACCEPT.join(', ') },
      signal: opts.signal,
      followRedirects: true,
      what,
    });
    await res.body.dump().catch(() => undefined);
    if (res.status === 404) return undefined;
    if (res.status !== 200) throw await statusError(res, what);
    const digest = header(res.headers, 'docker-content-digest');
    const size = contentLength(res);
    if (!digest || size === undefined || !digest.startsWith('sha256:')) {
      const m = await this.getManifest(ref, opts);
      return { digest: m.digest, size: m.size, mediaType: m.mediaType };
    }
    checkDigest(digest, 'Docker-Content-Digest from registry');
    if (ref.digest && digest !== ref.digest) throw new DigestMismatchError(`${what}: registry claims ${digest}`, ref.digest, digest);
    const mediaType = header(res.headers, 'content-type')?.split(';')[0]?.trim();
    return mediaType ? { digest, size, mediaType } : { digest, size };
  }

  async resolveImage(refLike: RefLike, opts: ResolveOptions = {}): Promise<ResolvedImage> {
    const ref = toImageReference(refLike);
    const want = opts.platform ?? this.options.platform ?? hostPlatform();
    let m = await this.getManifest(ref, opts);
    let index: ManifestResult | undefined;
    for (let depth = 0; isIndexMediaType(m.mediaType); depth++) {
      if (depth >= 2) throw invalidArgument(`${formatReference(ref)}: indexes nested too deeply`);
      index ??= m;
      const desc = selectPlatformManifest(m.manifest as ImageIndex, want);
      if (!desc) {
        const have = (m.manifest as ImageIndex).manifests.map((d) => formatPlatform(d.platform)).join(', ');
        throw notFound(`${formatReference(ref)}: no manifest for platform ${formatPlatform(want)} (index has: ${have || 'none'})`);
      }
      if (desc.size > this.maxManifest) throw unavailable(`${formatReference(ref)}: platform manifest too large (${desc.size})`);
      const next = await this.getManifest({ registry: ref.registry, repository: ref.repository, digest: desc.digest }, opts);
      if (next.size !== desc.size) {
        throw new DigestMismatchError(`manifest ${desc.digest}: size ${next.size} differs from the index's ${desc.size}`, desc.digest, next.digest);
      }
      m = next;
    }
    if (!isImageManifestMediaType(m.mediaType)) throw invalidArgument(`${formatReference(ref)}: not an image manifest (${m.mediaType})`);
    const out: ResolvedImage = { digest: m.digest, mediaType: m.mediaType, size: m.size, bytes: m.bytes, manifest: m.manifest as ImageManifest };
    if (index) out.index = index;
    return out;
  }

  async putManifest(refLike: RefLike, manifest: Uint8Array | object, opts: PutManifestOptions = {}): Promise<{ digest: string }> {
    const ref = toImageReference(refLike);
    const bytes = manifest instanceof Uint8Array ? Buffer.from(manifest) : Buffer.from(JSON.stringify(manifest), 'utf8');
    const what = `PUT manifest ${formatReference(ref)}`;
    if (bytes.length > this.maxManifest) throw invalidArgument(`${what}: ${bytes.length} bytes exceeds the ${this.maxManifest} byte limit`);
    const parsed = parseManifest(bytes, opts.mediaType);
    const mediaType = opts.mediaType ?? parsed.mediaType;
    const digest = sha256Digest(bytes);
    if (ref.digest && ref.digest !== digest) throw invalidArgument(`${what}: content digest is ${digest}`);
    const res = await this.send({
      registry: ref.registry,
      scopes: [repositoryScope(ref.repository, true)],
      method: 'PUT',
      url: this.manifestPath(ref),
      headers: { 'content-type': mediaType, 'content-length': String(bytes.length) },
      body: () => bytes,
      signal: opts.signal,
      what,
    });
    if (res.status !== 201 && res.status !== 200 && res.status !== 202) throw await statusError(res, what);
    await res.body.dump().catch(() => undefined);
    const claimed = header(res.headers, 'docker-content-digest');
    if (claimed && claimed.startsWith('sha256:') && claimed !== digest) {
      throw new DigestMismatchError(`${what}: registry stored ${claimed.slice(0, 80)}, expected ${digest}`, digest, claimed);
    }
    return { digest };
  }

  async listTags(repoLike: RepoLike, opts: RequestOptions = {}): Promise<string[]> {
    const repo = toRepositoryRef(repoLike);
    const what = `list tags of ${formatReference(repo)}`;
    const tags: string[] = [];
    let url: string | URL = `/v2/${repo.repository}/tags/list?n=1000`;
    for (let page = 0; page < MAX_TAG_PAGES; page++) {
      const res = await this.send({
        registry: repo.registry,
        scopes: [repositoryScope(repo.repository, false)],
        method: 'GET',
        url,
        signal: opts.signal,
        what,
      });
      if (res.status !== 200) throw await statusError(res, what);
      const doc = JSON.parse((await readCapped(res.body, 4 << 20, what)).toString('utf8')) as { tags?: unknown };
      if (Array.isArray(doc.tags)) for (const t of doc.tags) if (typeof t === 'string') tags.push(t);
      const link = header(res.headers, 'link');
      const m = link ? /<([^>]+)>\s*;\s*rel="?next"?/.exec(link) : null;
      if (!m) return tags;
      const next: URL = new URL(m[1]!, res.url);
      if (next.origin !== res.url.origin) throw unavailable(`${what}: pagination link to another origin`);
      url = next;
    }
    return tags;
  }

  /**
   * The OCI referrers API (`GET /v2/<name>/referrers/<digest>`): the image
   * index listing the manifests whose `subject` is `digest`, filtered by
   * `artifactType` when given (a registry may ignore the filter; callers
   * filter again). Returns undefined when the registry has no referrers API
   * (404 without an OCI index, 400, 405): use the referrers tag schema then
   * (referrers.ts).
   */
  async getReferrers(repoLike: RepoLike, digest: string, opts: RequestOptions & { artifactType?: string } = {}): Promise<ImageIndex | undefined> {
    const repo = toRepositoryRef(repoLike);
    checkDigest(digest);
    const what = `GET referrers of ${formatReference(repo)}@${digest}`;
    const query = opts.artifactType ? `?artifactType=${encodeURIComponent(opts.artifactType)}` : '';
    const res = await this.send({
      registry: repo.registry,
      scopes: [repositoryScope(repo.repository, false)],
      method: 'GET',
      url: `/v2/${repo.repository}/referrers/${digest}${query}`,
      headers: { accept: 'application/vnd.oci.image.index.v1+json' },
      signal: opts.signal,
      followRedirects: true,
      what,
    });
    const type = header(res.headers, 'content-type')?.split(';')[0]?.trim();
    if (res.status !== 200 || type !== 'application/vnd.oci.image.index.v1+json') {
      // The spec: a registry with the API answers 200 with an index (possibly empty), also for an unknown digest.
      if (res.status === 404 || res.status === 400 || res.status === 405 || res.status === 200) {
        await res.body.dump().catch(() => undefined);
        return undefined;
      }
      throw await statusError(res, what);
    }
    const bytes = await readCapped(res.body, this.maxManifest, what);
    const parsed = parseManifest(bytes, type);
    if (!isIndexMediaType(parsed.mediaType)) throw invalidArgument(`${what}: the answer is not an image index`);
    return parsed.manifest as ImageIndex;
  }

  private blobPath(repo: RepositoryRef, digest: string): string {
    return `/v2/${repo.repository}/blobs/${checkDigest(digest)}`;
  }

  async statBlob(repoLike: RepoLike, digest: string, opts: RequestOptions = {}): Promise<BlobInfo | undefined> {
    const repo = toRepositoryRef(repoLike);
    const what = `HEAD blob ${digest} in ${formatReference(repo)}`;
    const res = await this.send({
      registry: repo.registry,
      scopes: [repositoryScope(repo.repository, false)],
      method: 'HEAD',
      url: this.blobPath(repo, digest),
      signal: opts.signal,
      followRedirects: true,
      what,
    });
    await res.body.dump().catch(() => undefined);
    if (res.status === 404) return undefined;
    if (res.status !== 200) throw await statusError(res, what);
    const size = contentLength(res);
    if (size === undefined) throw unavailable(`${what}: no valid Content-Length`);
    const claimed = header(res.headers, 'docker-content-digest');
    if (claimed && claimed.startsWith('sha256:') && claimed !== digest) {
      throw new DigestMismatchError(`${what}: registry claims ${claimed.slice(0, 80)}`, digest, claimed);
    }
    return { digest, size };
  }

  /**
   * Open a blob (or a range of it) on the registry's hosts: mirrors in order,
   * then the registry. A whole blob from a mirror is verified as it streams:
   * wrong bytes end the stream with a DigestMismatchError (the consumer starts
   * over, and the mirror is put behind the registry for a while).
   */
  async openBlob(repoLike: RepoLike, digest: string, opts: OpenBlobOptions = {}): Promise<BlobStream> {
    const repo = toRepositoryRef(repoLike);
    const what = `GET blob ${digest} from ${formatReference(repo)}`;
    checkDigest(digest);
    return this.pull(repo.registry, 'pull', opts.signal, what, opts.noMirrors, async (via, signal, answered) => {
      const out = await this.openBlobVia(via, repo, digest, { ...opts, signal }, answered);
      const route = via.route;
      if (route?.role !== 'mirror' || !this.router) return out;
      const router = this.router;
      const src = out.stream;
      let stream: Readable = src;
      if (!opts.range) {
        const verifier = new DigestVerifier(digest, out.size >= 0 ? out.size : opts.expectedSize);
        src.on('error', (e) => verifier.destroy(e));
        verifier.on('close', () => src.destroy());
        stream = src.pipe(verifier);
      }
      // A mirror whose body breaks or lies is put behind the registry, so the consumer's next try goes elsewhere.
      stream.on('error', (e) => {
        if (!signal?.aborted && !opts.signal?.aborted) {
          router.markFailed(route.host);
          if (e instanceof DigestMismatchError) {
            e.message = `${e.message} (from mirror ${route.base.host})`;
          }
        }
      });
      return { ...out, stream, mirror: { host: route.base.host, reject: () => router.markFailed(route.host) } };
    });
  }

  private async openBlobVia(via: Via, repo: RepositoryRef, digest: string, opts: OpenBlobOptions, answered: () => void): Promise<BlobStream> {
    const what = `GET blob ${digest} from ${formatReference(repo)}${via.route?.role === 'mirror' ? ` (mirror ${via.route.base.host})` : ''}`;
    const range = opts.range;
    if (range) {
      if (!Number.isSafeInteger(range.start) || range.start < 0 || (range.end !== undefined && (!Number.isSafeInteger(range.end) || range.end < range.start))) {
        throw invalidArgument(`${what}: invalid range ${JSON.stringify(range)}`);
      }
    }
    const headers: Record<string, string> = { ...via.headers };
    if (range) headers.range = `bytes=${range.start}-${range.end ?? ''}`;
    const res = await this.send({
      ...this.viaRequest(via),
      scopes: [repositoryScope(repo.repository, false)],
      method: 'GET',
      url: via.path(this.blobPath(repo, digest).slice(3)),
      headers,
      signal: opts.signal,
      followRedirects: true,
      what,
    });
    answered();
    const len = contentLength(res);
    const fail = async (err: GearError): Promise<never> => {
      res.body.destroy();
      throw err;
    };
    if (res.status === 206 && range) {
      const cr = /^bytes ([0-9]+)-([0-9]+)\/([0-9]+|\*)$/.exec(header(res.headers, 'content-range') ?? '');
      if (!cr) return fail(unavailable(`${what}: 206 without a valid Content-Range`));
      const start = Number(cr[1]);
      const end = Number(cr[2]);
      const total = cr[3] === '*' ? -1 : Number(cr[3]);
      const wantEnd = range.end === undefined ? (total >= 0 ? total - 1 : end) : total >= 0 ? Math.min(range.end, total - 1) : range.end;
      if (start !== range.start || end !== wantEnd || end < start || (total >= 0 && end >= total)) {
        return fail(unavailable(`${what}: asked for bytes ${range.start}-${range.end ?? ''}, got ${start}-${end}/${cr[3]}`));
      }
      if (opts.expectedSize !== undefined && total >= 0 && total !== opts.expectedSize) {
        return fail(unavailable(`${what}: blob size ${total} differs from the expected ${opts.expectedSize}`));
      }
      const length = end - start + 1;
      if (len !== undefined && len !== length) return fail(unavailable(`${what}: Content-Length ${len} does not match the range`));
      const stream = bodyStream(res, new ExactLength(0, length, what));
      return { stream, size: total, length, range: { start, end } };
    }
    if (res.status === 200) {
      const size = len ?? opts.expectedSize ?? -1;
      if (opts.expectedSize !== undefined && len !== undefined && len !== opts.expectedSize) {
        return fail(unavailable(`${what}: blob size ${len} differs from the expected ${opts.expectedSize}`));
      }
      let skip = 0;
      let length = size;
      if (range) {
        // The server ignored Range: serve the range from the full body.
        if (size < 0) return fail(unavailable(`${what}: server ignored Range and sent no length`));
        if (range.start >= size) return fail(invalidArgument(`${what}: range start ${range.start} beyond blob size ${size}`));
        skip = range.start;
        length = Math.min(range.end ?? size - 1, size - 1) - range.start + 1;
      }
      const stream = bodyStream(res, new ExactLength(skip, length, what, size));
      const out: BlobStream = { stream, size, length };
      if (range) out.range = { start: skip, end: skip + length - 1 };
      return out;
    }
    if (res.status === 416) {
      await res.body.dump().catch(() => undefined);
      throw invalidArgument(`${what}: range ${headers.range} not satisfiable`);
    }
    throw await statusError(res, what);
  }

  async fetchBlob(repoLike: RepoLike, digest: string, opts: FetchVerifiedOptions & { maxBytes?: number } = {}): Promise<Buffer> {
    checkDigest(digest);
    const max = opts.maxBytes ?? 64 << 20;
    const what = `GET blob ${digest}`;
    const repo = toRepositoryRef(repoLike);
    return this.retryBody(what, opts.signal, () => this.pull(repo.registry, 'pull', opts.signal, what, opts.noMirrors, async (via, signal, answered) => {
      const o: OpenBlobOptions = { signal };
      if (opts.expectedSize !== undefined) o.expectedSize = opts.expectedSize;
      const { stream, size } = await this.openBlobVia(via, repo, digest, o, answered);
      if (size > max) {
        stream.destroy();
        throw unavailable(`${what}: ${size} bytes exceeds the ${max} byte limit`);
      }
      const verifier = new DigestVerifier(digest, opts.expectedSize ?? (size >= 0 ? size : undefined));
      stream.on('error', (e) => verifier.destroy(e));
      return readCapped(stream.pipe(verifier), max, what);
    }));
  }

  async fetchBlobVerified(repoLike: RepoLike, digest: string, destPath: string, opts: FetchVerifiedOptions = {}): Promise<{ size: number }> {
    checkDigest(digest);
    const repo = toRepositoryRef(repoLike);
    const what = `GET blob ${digest} into ${destPath}`;
    return this.retryBody(what, opts.signal, () => this.pull(repo.registry, 'pull', opts.signal, what, opts.noMirrors, async (via, signal, answered) => {
      let fh: FileHandle | undefined;
      try {
        const o: OpenBlobOptions = { signal };
        if (opts.expectedSize !== undefined) o.expectedSize = opts.expectedSize;
        const { stream, size } = await this.openBlobVia(via, repo, digest, o, answered);
        const verifier = new DigestVerifier(digest, opts.expectedSize ?? (size >= 0 ? size : undefined));
        try {
          fh = await open(destPath, 'w', 0o644);
        } catch (err) {
          stream.destroy();
          throw err;
        }
        stream.on('error', (e) => verifier.destroy(e));
        for await (const chunk of stream.pipe(verifier)) {
          if (signal?.aborted) throw signal.reason;
          await fh.write(chunk as Buffer);
        }
        await fh.sync();
        await fh.close();
        fh = undefined;
        return { size: verifier.bytes };
      } catch (err) {
        await fh?.close().catch(() => undefined);
        await unlink(destPath).catch(() => undefined);
        throw err;
      }
    }));
  }

  /**
   * Start an upload session (optionally trying a mount). Returns mounted=true
   * on 201, else the session's Location.
   */
  private async startUpload(repo: RepositoryRef, digest: string, from: RepositoryRef | undefined, signal?: AbortSignal): Promise<{ mounted: true } | { mounted: false; location: URL }> {
    const what = from ? `mount blob ${digest} from ${from.repository} into ${formatReference(repo)}` : `start upload to ${formatReference(repo)}`;
    const scopes = [repositoryScope(repo.repository, true)];
    let url = `/v2/${repo.repository}/blobs/uploads/`;
    if (from) {
      url += `?mount=${encodeURIComponent(digest)}&from=${encodeURIComponent(from.repository)}`;
      if (from.repository !== repo.repository) scopes.push(repositoryScope(from.repository, false));
    }
    const res = await this.send({ registry: repo.registry, scopes, method: 'POST', url, headers: { 'content-length': '0' }, signal, what });
    if (res.status === 201 && from) {
      await res.body.dump().catch(() => undefined);
      return { mounted: true };
    }
    if (res.status !== 202) throw await statusError(res, what);
    await res.body.dump().catch(() => undefined);
    return { mounted: false, location: this.uploadLocation(res, what) };
  }

  private uploadLocation(res: SendResponse, what: string): URL {
    const loc = header(res.headers, 'location');
    if (!loc) throw unavailable(`${what}: registry sent no upload Location`);
    let url: URL;
    try {
      url = new URL(loc, res.url);
    } catch (err) {
      throw unavailable(`${what}: invalid upload Location`, err);
    }
    this.transport.checkFollow(res.url, url, what);
    return url;
  }

  async mountBlob(repoLike: RepoLike, digest: string, fromLike: RepoLike, opts: RequestOptions = {}): Promise<boolean> {
    const repo = toRepositoryRef(repoLike);
    const from = toRepositoryRef(fromLike);
    checkDigest(digest);
    if (from.registry !== repo.registry) throw invalidArgument(`mount ${digest}: ${from.registry} and ${repo.registry} are different registries`);
    const r = await this.startUpload(repo, digest, from, opts.signal);
    if (r.mounted) return true;
    await this.cancelUpload(repo, r.location);
    return false;
  }

  private async cancelUpload(repo: RepositoryRef, location: URL): Promise<void> {
    try {
      const res = await this.send({
        registry: repo.registry,
        scopes: [repositoryScope(repo.repository, true)],
        method: 'DELETE',
        url: location,
        what: 'cancel upload',
        noRetry: true,
      });
      await res.body.dump();
    } catch {
      // best effort: the registry expires abandoned uploads itself
    }
  }

  async pushBlob(repoLike: RepoLike, digest: string, source: BlobSource, opts: PushBlobOptions = {}): Promise<PushBlobResult> {
    const repo = toRepositoryRef(repoLike);
    checkDigest(digest);
    const size = sourceSize(source);
    const what = `upload blob ${digest} to ${formatReference(repo)}`;
    if (!opts.skipExistsCheck) {
      const st = await this.statBlob(repo, digest, opts);
      if (st) return { digest, size: st.size, status: 'exists' };
    }
    let session: URL | undefined;
    for (const f of opts.mountFrom ?? []) {
      const from = toRepositoryRef(f);
      if (from.registry !== repo.registry || from.repository === repo.repository) continue;
      const r = await this.startUpload(repo, digest, from, opts.signal);
      if (r.mounted) return { digest, size, status: 'mounted' };
      if (session) await this.cancelUpload(repo, session);
      session = r.location;
    }
    const started = Date.now();
    for (let n = 1; ; n++) {
      try {
        const location = session ?? (await this.startUpload(repo, digest, undefined, opts.signal) as { location: URL }).location;
        session = undefined;
        await this.upload(repo, digest, source, size, location, opts, what);
        return { digest, size, status: 'uploaded' };
      } catch (err) {
        session = undefined;
        const retryable = !opts.signal?.aborted && ((err instanceof GearError && err.class === 'Unavailable' && !(err instanceof DigestMismatchError)) || (!(err instanceof GearError) && isRetryableNetworkError(err)));
        const delay = retryable ? nextRetryDelay(n, Date.now() - started, this.transport.retry) : undefined;
        if (delay === undefined) {
          if (err instanceof GearError || opts.signal?.aborted) throw err;
          throw unavailable(`${what}: ${(err as Error)?.message ?? String(err)}`, err);
        }
        await sleep(delay, opts.signal);
        // A lost response may hide a completed upload.
        if (await this.statBlob(repo, digest, opts).catch(() => undefined)) return { digest, size, status: 'uploaded' };
      }
    }
  }

  /** One upload session: monolithic PUT, or PATCH chunks then PUT. Not retried here (the caller restarts the session). */
  private async upload(repo: RepositoryRef, digest: string, source: BlobSource, size: number, location: URL, opts: PushBlobOptions, what: string): Promise<void> {
    const scopes = [repositoryScope(repo.repository, true)];
    const withDigest = (u: URL) => {
      const x = new URL(u);
      x.searchParams.set('digest', digest);
      return x;
    };
    let loc = location;
    const chunk = opts.chunkSize;
    if (chunk !== undefined && (!Number.isSafeInteger(chunk) || chunk <= 0)) throw invalidArgument(`${what}: invalid chunkSize ${chunk}`);
    if (chunk !== undefined && size > chunk) {
      for (let start = 0; start < size; start += chunk) {
        const end = Math.min(size, start + chunk);
        const res = await this.send({
          registry: repo.registry,
          scopes,
          method: 'PATCH',
          url: loc,
          headers: {
            'content-type': 'application/octet-stream',
            'content-length': String(end - start),
            'content-range': `${start}-${end - 1}`,
          },
          body: () => openSource(source, start, end),
          signal: opts.signal,
          what: `${what} (bytes ${start}-${end - 1})`,
          noRetry: true,
        });
        if (res.status !== 202) throw await statusError(res, `${what} (bytes ${start}-${end - 1})`);
        await res.body.dump().catch(() => undefined);
        loc = this.uploadLocation(res, what);
      }
      const res = await this.send({
        registry: repo.registry,
        scopes,
        method: 'PUT',
        url: withDigest(loc),
        headers: { 'content-length': '0' },
        signal: opts.signal,
        what,
        noRetry: true,
      });
      return this.checkUploaded(res, digest, what);
    }
    const res = await this.send({
      registry: repo.registry,
      scopes,
      method: 'PUT',
      url: withDigest(loc),
      headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
      body: () => openSource(source, 0, size),
      signal: opts.signal,
      what,
      noRetry: true,
    });
    return this.checkUploaded(res, digest, what);
  }

  private async checkUploaded(res: SendResponse, digest: string, what: string): Promise<void> {
    if (res.status !== 201 && res.status !== 204) {
      const err = await statusError(res, what);
      if (/DIGEST_INVALID|SIZE_INVALID/.test(err.message)) {
        throw invalidArgument(`${what}: the uploaded content does not match its digest/size (${err.message})`);
      }
      throw err;
    }
    await res.body.dump().catch(() => undefined);
    const claimed = header(res.headers, 'docker-content-digest');
    if (claimed && claimed.startsWith('sha256:') && claimed !== digest) {
      throw new DigestMismatchError(`${what}: registry stored ${claimed.slice(0, 80)}`, digest, claimed);
    }
  }

  async close(): Promise<void> {
    await this.transport.close();
  }
}
