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
import type { Readable } from 'node:stream';
import { GearError } from '../errors.js';
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

/** A BlobSource reading [start, end) of a file; re-openable for retries and chunks. */
export function fileBlobSource(path: string, size: number): BlobSource {
  return {
    size,
    open: (start: number, end: number): Readable =>
      end > start ? createReadStream(path, { start, end: end - 1 }) : createReadStream(path, { start: 0, end: -1 }),
  };
}

const todo = () => new GearError('Unimplemented', 'registry client: not implemented yet');

export class RegistryClient {
  constructor(readonly options: RegistryClientOptions = {}) {}

  /** GET a manifest (any supported type). Verified against the digest when fetched by digest. */
  async getManifest(_ref: RefLike, _opts: RequestOptions = {}): Promise<ManifestResult> {
    throw todo();
  }

  /** HEAD a manifest: digest, size, media type; undefined when absent. */
  async headManifest(_ref: RefLike, _opts: RequestOptions = {}): Promise<BlobInfo | undefined> {
    throw todo();
  }

  /** Fetch a manifest and, when it is an index, select and fetch the platform's manifest. */
  async resolveImage(_ref: RefLike, _opts: ResolveOptions = {}): Promise<ResolvedImage> {
    throw todo();
  }

  /** PUT a manifest by tag or by digest; returns its digest. */
  async putManifest(_ref: RefLike, _manifest: Uint8Array | object, _opts: PutManifestOptions = {}): Promise<{ digest: string }> {
    throw todo();
  }

  /** Tags of a repository (follows `Link` pagination, bounded). */
  async listTags(_repo: RepoLike, _opts: RequestOptions = {}): Promise<string[]> {
    throw todo();
  }

  /** HEAD a blob: its size, or undefined when the registry does not have it. */
  async statBlob(_repo: RepoLike, _digest: string, _opts: RequestOptions = {}): Promise<BlobInfo | undefined> {
    throw todo();
  }

  /** GET a blob or a range of it as a stream (unverified: the caller verifies or uses fetchBlobVerified). */
  async openBlob(_repo: RepoLike, _digest: string, _opts: OpenBlobOptions = {}): Promise<BlobStream> {
    throw todo();
  }

  /** GET a whole small blob into memory, verified (configs, Gear index manifests). Default cap 64 MiB. */
  async fetchBlob(_repo: RepoLike, _digest: string, _opts: FetchVerifiedOptions & { maxBytes?: number } = {}): Promise<Buffer> {
    throw todo();
  }

  /**
   * Stream a blob into `destPath` while hashing; on mismatch (or any failure)
   * the file is deleted and the promise rejects. The file is written in place:
   * give a staging path and rename it into the cache after this resolves.
   */
  async fetchBlobVerified(_repo: RepoLike, _digest: string, _destPath: string, _opts: FetchVerifiedOptions = {}): Promise<{ size: number }> {
    throw todo();
  }

  /** Upload a blob unless present: HEAD, then cross-repo mount, then monolithic or chunked upload. */
  async pushBlob(_repo: RepoLike, _digest: string, _source: BlobSource, _opts: PushBlobOptions = {}): Promise<PushBlobResult> {
    throw todo();
  }

  /** Cross-repository mount; true when mounted (201), false when the registry wants an upload (202). */
  async mountBlob(_repo: RepoLike, _digest: string, _from: RepoLike, _opts: RequestOptions = {}): Promise<boolean> {
    throw todo();
  }

  /** Close every connection pool. Idempotent. */
  async close(): Promise<void> {}
}
