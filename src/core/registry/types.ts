/**
 * Public types of the registry client (see client.ts for how to use it).
 */
import type { Readable } from 'node:stream';
import type { RegistryCredentials } from './auth.js';
import type { ImageManifest, Manifest, Platform } from './media-types.js';
import type { ImageReference, RepositoryRef } from './reference.js';
import type { RetryOptions } from './retry.js';

/** A repository: `"localhost:5000/a/b"` or a parsed RepositoryRef. */
export type RepoLike = string | RepositoryRef;
/** An image: `"localhost:5000/a/b:tag"`, `"…@sha256:…"` or a parsed ImageReference. */
export type RefLike = string | ImageReference;

export interface RegistryClientOptions {
  /** Path of a Docker config.json. Default: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`. */
  dockerConfigPath?: string;
  /** Credentials by registry host[:port]; take precedence over config.json. */
  credentials?: Record<string, RegistryCredentials>;
  /**
   * Registries (host[:port]) that may be reached over plain http://.
   * localhost, 127.0.0.0/8 and [::1] always use http://; everything else https://.
   */
  insecureRegistries?: string[];
  /** Platform chosen from an index. Default: linux and the host's architecture. */
  platform?: Platform;
  /** Keep-alive connections per origin (one undici Pool per origin). Default 6. */
  maxConnectionsPerOrigin?: number;
  /** Requests in flight over the whole client, across origins. Default 32. */
  maxConcurrentRequests?: number;
  /** Retry policy for 408/429/5xx and connection failures. */
  retry?: Partial<RetryOptions>;
  /** Connect timeout. Default 10 s. */
  connectTimeoutMs?: number;
  /** Time to wait for response headers. Default 30 s. */
  headersTimeoutMs?: number;
  /** Longest pause between two body chunks. Default 30 s. */
  bodyTimeoutMs?: number;
  /** Largest manifest accepted. Default 4 MiB. */
  maxManifestBytes?: number;
  /** User-Agent header. Default `gear/0.1`. */
  userAgent?: string;
  /** Registry mirrors for pulls (hosts.ts, mirrors.ts). Default: none. */
  mirrors?: MirrorOptions;
}

export interface MirrorOptions {
  /** containerd-style hosts directory (`<dir>/<host[:port]>/hosts.toml`, `_default/hosts.toml`); '' or absent: none. */
  configDir?: string | undefined;
  /** Docker Hub mirrors, as Docker's daemon.json `registry-mirrors`. */
  dockerHubMirrors?: string[] | undefined;
  /** Longest wait for a mirror's response headers before the next host is tried. Default 5 s. */
  mirrorTimeoutMs?: number;
}

/** A manifest as fetched: the exact bytes (their digest is the manifest's identity) and the parsed form. */
export interface ManifestResult {
  digest: string;
  mediaType: string;
  size: number;
  bytes: Buffer;
  manifest: Manifest;
}

/** An image manifest for one platform, resolved from a tag/digest (through an index if there was one). */
export interface ResolvedImage {
  digest: string;
  mediaType: string;
  size: number;
  bytes: Buffer;
  manifest: ImageManifest;
  /** The index the manifest was selected from, when the reference named an index. */
  index?: ManifestResult;
}

export interface BlobInfo {
  digest: string;
  size: number;
  mediaType?: string;
}

export interface RequestOptions {
  signal?: AbortSignal;
  /** Ask the registry itself, never a mirror (reads of a push destination). */
  noMirrors?: boolean;
}

/** Byte range, both ends inclusive (as HTTP Range). `end` omitted: to the end of the blob. */
export interface ByteRange {
  start: number;
  end?: number;
}

export interface OpenBlobOptions extends RequestOptions {
  range?: ByteRange;
  /** Known blob size (from a descriptor); a server disagreeing is an error. */
  expectedSize?: number;
}

export interface BlobStream {
  /** The body. Errors (reset, idle timeout) surface as stream errors; not verified (a range cannot be). */
  stream: Readable;
  /** Total size of the blob when known (Content-Length of a full GET, or the Content-Range total), else -1. */
  size: number;
  /** Bytes this stream will yield. */
  length: number;
  /** The range served, inclusive, when a range was requested. */
  range?: { start: number; end: number };
  /**
   * Set when a registry mirror served the body: `reject()` puts the mirror behind the registry
   * for a while (the caller found the content wrong), so the next open goes elsewhere.
   */
  mirror?: { host: string; reject(): void };
}

export interface FetchVerifiedOptions extends RequestOptions {
  expectedSize?: number;
}

/**
 * Upload content. A buffer, or a re-openable source: `open(start, end)`
 * returns bytes [start, end) and may be called again for a retry or for each
 * chunk of a chunked upload, so no upload ever needs a non-replayable body.
 */
export type BlobSource =
  | Uint8Array
  | {
      size: number;
      open(start: number, end: number): Readable | AsyncIterable<Uint8Array> | Promise<Readable | AsyncIterable<Uint8Array>>;
    };

export interface PushBlobOptions extends RequestOptions {
  /** Try a cross-repository mount from these repositories (same registry) first. */
  mountFrom?: RepoLike[];
  /** Upload in PATCH chunks of this size when the blob is larger. Default: monolithic. */
  chunkSize?: number;
  /** Skip the HEAD that avoids uploading what the registry already has. */
  skipExistsCheck?: boolean;
}

export interface PushBlobResult {
  digest: string;
  size: number;
  /** exists: already there (HEAD); mounted: cross-repo mount; uploaded: bytes sent. */
  status: 'exists' | 'mounted' | 'uploaded';
}

export interface PutManifestOptions extends RequestOptions {
  /** Content-Type. Default: the document's mediaType field, else OCI manifest/index by shape. */
  mediaType?: string;
}

export interface ResolveOptions extends RequestOptions {
  platform?: Platform;
}
