/**
 * Retry policy for registry requests: exponential backoff with jitter,
 * bounded both in attempts and in total time, honouring Retry-After.
 * Pure functions plus an abortable sleep, so the policy is unit-testable.
 */

export interface RetryOptions {
  /** Total attempts including the first (default 5). 1 disables retries. */
  maxAttempts: number;
  /** Backoff base before jitter (default 200 ms). */
  minDelayMs: number;
  /** Cap of one backoff, also of an honoured Retry-After (default 10 s). */
  maxDelayMs: number;
  /** No new attempt starts after this much time since the first (default 60 s). */
  maxTotalMs: number;
}

export const DEFAULT_RETRY: RetryOptions = { maxAttempts: 5, minDelayMs: 200, maxDelayMs: 10_000, maxTotalMs: 60_000 };

/**
 * Delay before retry number `attempt` (1 = the first retry): a uniformly
 * random value in [d/2, d] where d = min(maxDelay, minDelay * 2^(attempt-1))
 * ("equal jitter": spreads a thundering herd, keeps a floor).
 */
export function backoffDelay(attempt: number, opts: RetryOptions, random: () => number = Math.random): number {
  const exp = Math.min(30, Math.max(0, attempt - 1));
  const d = Math.min(opts.maxDelayMs, opts.minDelayMs * 2 ** exp);
  return Math.round(d / 2 + random() * (d / 2));
}

/**
 * Parse a Retry-After header (delta-seconds or an HTTP-date) into a delay in
 * ms, or undefined when absent or malformed. Negative dates give 0.
 */
export function parseRetryAfter(value: string | string[] | undefined, now: number = Date.now()): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined) return undefined;
  const t = v.trim();
  if (/^[0-9]{1,9}$/.test(t)) return Number(t) * 1000;
  if (!/[a-z]/i.test(t)) return undefined;
  const date = Date.parse(t);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - now);
}

/**
 * The wait before the next attempt, or undefined when the budget is spent:
 * backoff, raised to Retry-After when the server sent one (capped at
 * maxDelayMs), and never past the maxTotalMs deadline.
 */
export function nextRetryDelay(
  attempt: number,
  elapsedMs: number,
  opts: RetryOptions,
  retryAfterMs?: number,
  random: () => number = Math.random,
): number | undefined {
  if (attempt >= opts.maxAttempts) return undefined;
  let delay = backoffDelay(attempt, opts, random);
  if (retryAfterMs !== undefined) delay = Math.max(delay, Math.min(retryAfterMs, opts.maxDelayMs));
  if (elapsedMs + delay > opts.maxTotalMs) return undefined;
  return delay;
}

/** HTTP statuses worth retrying: rate limiting and transient server trouble. */
export function isRetryableStatus(status: number): boolean {
  return status === 408 || status === 429 || status === 500 || status === 502 || status === 503 || status === 504;
}

const RETRYABLE_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EAI_AGAIN',
  'ENETUNREACH',
  'EHOSTUNREACH',
  'UND_ERR_SOCKET',
  'UND_ERR_CLOSED',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_HEADERS_TIMEOUT',
  'UND_ERR_BODY_TIMEOUT',
  'UND_ERR_REQ_CONTENT_LENGTH_MISMATCH',
  'UND_ERR_RES_CONTENT_LENGTH_MISMATCH',
]);

const TIMEOUT_CODES = new Set(['ETIMEDOUT', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT']);

function codesOf(err: unknown): string[] {
  const codes: string[] = [];
  let cur: unknown = err;
  for (let i = 0; i < 5 && cur && typeof cur === 'object'; i++) {
    const c = (cur as { code?: unknown }).code;
    if (typeof c === 'string') codes.push(c);
    cur = (cur as { cause?: unknown }).cause;
  }
  return codes;
}

/** A connection-level failure (reset, refused, timeout) where a replay is safe. */
export function isRetryableNetworkError(err: unknown): boolean {
  return codesOf(err).some((c) => RETRYABLE_CODES.has(c));
}

/** A timeout (connect, headers or body idle). */
export function isTimeoutError(err: unknown): boolean {
  return codesOf(err).some((c) => TIMEOUT_CODES.has(c));
}

/** Sleep `ms`, rejecting with the signal's reason if it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
