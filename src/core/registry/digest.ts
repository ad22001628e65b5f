/**
 * Content digests. Only `sha256:<64 lowercase hex>` is accepted, and it is
 * validated before it is ever used to build a URL or a path (CVE-2024-3727:
 * unvalidated digests gave path traversal and unexpected registry requests).
 */
import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { GearError, invalidArgument } from '../errors.js';

const DIGEST_RE = /^sha256:[a-f0-9]{64}$/;

/** True for a well-formed `sha256:<64 hex>` digest. */
export function isDigest(s: unknown): s is string {
  return typeof s === 'string' && DIGEST_RE.test(s);
}

/** Returns `s` when it is a valid sha256 digest; throws InvalidArgument otherwise. */
export function checkDigest(s: unknown, what = 'digest'): string {
  if (!isDigest(s)) {
    const shown = typeof s === 'string' ? JSON.stringify(s.slice(0, 80)) : typeof s;
    throw invalidArgument(`invalid ${what} ${shown}: want sha256:<64 lowercase hex>`);
  }
  return s;
}

/** The 64 hex characters of a validated digest. */
export function digestHex(digest: string): string {
  return checkDigest(digest).slice('sha256:'.length);
}

/** sha256 digest of a buffer. */
export function sha256Digest(data: Uint8Array | string): string {
  return 'sha256:' + createHash('sha256').update(data).digest('hex');
}

/**
 * Content did not match its digest (or its declared size). A registry or a
 * path in between served wrong bytes; the class is Unavailable because the
 * content cannot be obtained, and callers can tell the case apart by type.
 */
export class DigestMismatchError extends GearError {
  readonly expected: string;
  readonly actual: string;
  constructor(message: string, expected: string, actual: string) {
    super('Unavailable', message);
    this.name = 'DigestMismatchError';
    this.expected = expected;
    this.actual = actual;
  }
}

/**
 * A pass-through stream that hashes and counts what flows through it. When
 * the stream ends, it fails with DigestMismatchError if the sha256 or the byte
 * count (when `expectedSize` is given) differ, so a consumer never sees a clean
 * end of wrong content. It also fails early when more than `expectedSize`
 * bytes arrive.
 */
export class DigestVerifier extends Transform {
  readonly expected: string;
  readonly expectedSize: number | undefined;
  private readonly hash: Hash = createHash('sha256');
  private count = 0;

  constructor(expected: string, expectedSize?: number) {
    super();
    this.expected = checkDigest(expected);
    this.expectedSize = expectedSize;
  }

  /** Bytes seen so far. */
  get bytes(): number {
    return this.count;
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.count += chunk.length;
    if (this.expectedSize !== undefined && this.count > this.expectedSize) {
      cb(
        new DigestMismatchError(
          `content of ${this.expected} is longer than the expected ${this.expectedSize} bytes`,
          this.expected,
          `size>${this.expectedSize}`,
        ),
      );
      return;
    }
    this.hash.update(chunk);
    cb(null, chunk);
  }

  override _flush(cb: TransformCallback): void {
    if (this.expectedSize !== undefined && this.count !== this.expectedSize) {
      cb(
        new DigestMismatchError(
          `content of ${this.expected} has ${this.count} bytes, expected ${this.expectedSize}`,
          this.expected,
          `size=${this.count}`,
        ),
      );
      return;
    }
    const actual = 'sha256:' + this.hash.digest('hex');
    if (actual !== this.expected) {
      cb(new DigestMismatchError(`content digest mismatch: expected ${this.expected}, got ${actual}`, this.expected, actual));
      return;
    }
    cb();
  }
}
