/**
 * The HTTP layer of the registry client: one keep-alive undici Pool per
 * origin, a client-wide concurrency limit, authentication (Bearer tokens,
 * Basic), bounded retries and redirects.
 *
 * `send()` returns a response whose body the caller must consume or dump; the
 * concurrency permit is held until that body closes, so a stream handed to a
 * consumer counts against the limit while it is open.
 *
 * Credential rule (CVE-2020-15157): an Authorization header is attached only
 * when the request URL's origin is the registry's own origin. Redirect targets
 * and upload Locations on other origins get none.
 */
import { createHash } from 'node:crypto';
import { Pool } from 'undici';
import type { IncomingHttpHeaders } from 'node:http';
import type { Readable } from 'node:stream';
import { rootCertificates } from 'node:tls';
import { GearError, deadlineExceeded, invalidArgument, unavailable } from '../errors.js';
import { Semaphore } from '../semaphore.js';
import {
  basicAuthorization,
  credentialsHint,
  dockerConfigPath,
  parseWWWAuthenticate,
  readDockerConfig,
  TokenCache,
  type AuthChallenge,
  type DockerConfigFile,
  type RegistryCredentials,
} from './auth.js';
import { CredentialResolver } from './credentials.js';
import { DOCKER_HUB, DOCKER_HUB_API_HOST } from './reference.js';
import {
  DEFAULT_RETRY,
  isRetryableNetworkError,
  isRetryableStatus,
  isTimeoutError,
  nextRetryDelay,
  parseRetryAfter,
  sleep,
  type RetryOptions,
} from './retry.js';
import type { RegistryClientOptions } from './types.js';

export type RequestBody = Uint8Array | string | Readable | null;

export interface SendRequest {
  /** Registry host[:port] the request belongs to (credentials and scheme come from it). */
  registry: string;
  /** Token scopes, e.g. `repository:a/b:pull`. */
  scopes: string[];
  method: 'GET' | 'HEAD' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  /** A path on the registry (`/v2/…`) or an absolute URL (an upload Location). */
  url: string | URL;
  headers?: Record<string, string>;
  /** Body factory: called again for every attempt, so a body is never replayed from a spent stream. */
  body?: () => RequestBody | Promise<RequestBody>;
  signal?: AbortSignal | undefined;
  /** Follow 3xx for GET/HEAD (bounded). */
  followRedirects?: boolean;
  /** Words for error messages: "GET manifest localhost:5000/a:1". */
  what: string;
  /** One attempt only (a request whose replay is not safe, e.g. a PATCH of upload data). */
  noRetry?: boolean;
  /**
   * The origin to send to when it is not the registry's own (a mirror, or a hosts.toml `server`);
   * `registry` then keys that host's credentials and tokens (mirrors.ts).
   */
  base?: URL;
  /** TLS settings of that host (hosts.toml `ca`, `skip_verify`). */
  tls?: HostTls;
}

export interface HostTls {
  /** Extra PEM CA certificates. */
  ca: string[];
  skipVerify: boolean;
}

/** A hash of a host's CA list, once per HostTls (a pool per distinct trust: equal lengths and tails must not share one). */
const caKeys = new WeakMap<HostTls, string>();
function caKey(tls: HostTls): string {
  let k = caKeys.get(tls);
  if (k === undefined) {
    const h = createHash('sha256');
    for (const pem of tls.ca) h.update(`${pem.length}:`).update(pem);
    k = h.digest('hex');
    caKeys.set(tls, k);
  }
  return k;
}

export interface SendResponse {
  status: number;
  headers: IncomingHttpHeaders;
  body: Readable & { dump(opts?: { limit: number }): Promise<void> };
  /** The URL that answered (after redirects). */
  url: URL;
}

const MAX_REDIRECTS = 5;
const MAX_TOKEN_RESPONSE = 1 << 20;

/** host[:port] that always may use http://: localhost, 127.0.0.0/8, [::1]. */
export function isLoopbackHost(hostPort: string): boolean {
  const host = hostPort.startsWith('[') ? hostPort.slice(0, hostPort.indexOf(']') + 1) : hostPort.replace(/:[0-9]+$/, '');
  return host === 'localhost' || host === '[::1]' || /^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$/.test(host);
}

export function header(h: IncomingHttpHeaders, name: string): string | undefined {
  const v = h[name.toLowerCase()];
  return Array.isArray(v) ? v[0] : v;
}

/** Read a body into memory, failing once it exceeds `max` bytes. */
export async function readCapped(body: Readable, max: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const chunk of body) {
    n += (chunk as Buffer).length;
    if (n > max) {
      body.destroy();
      throw unavailable(`${what}: response larger than ${max} bytes`);
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks);
}

/** Abort reasons become DeadlineExceeded for timeouts, otherwise are passed on as they are. */
function abortError(signal: AbortSignal, what: string): unknown {
  const r = signal.reason as { name?: string } | undefined;
  if (r && r.name === 'TimeoutError') return deadlineExceeded(`${what}: deadline exceeded`, r);
  return signal.reason;
}

export class RegistryTransport {
  readonly retry: RetryOptions;
  private readonly pools = new Map<string, Pool>();
  private readonly limiter: Semaphore;
  private readonly tokens = new TokenCache();
  private readonly challenges = new Map<string, AuthChallenge>();
  private readonly insecure: Set<string>;
  private readonly configPath: string;
  private configCache?: { at: number; value: Promise<DockerConfigFile> };
  private readonly credentialResolver = new CredentialResolver();
  /** The origin a non-registry auth key (a mirror host) was last reached at. */
  private readonly bases = new Map<string, URL>();
  private closed = false;

  constructor(private readonly opts: RegistryClientOptions) {
    this.retry = { ...DEFAULT_RETRY, ...(opts.retry ?? {}) };
    this.limiter = new Semaphore(Math.max(1, opts.maxConcurrentRequests ?? 32));
    this.insecure = new Set((opts.insecureRegistries ?? []).map((h) => h.toLowerCase()));
    this.configPath = dockerConfigPath(opts.dockerConfigPath);
  }

  /** May this host[:port] be reached over http://? */
  allowsHttp(hostPort: string): boolean {
    return isLoopbackHost(hostPort.toLowerCase()) || this.insecure.has(hostPort.toLowerCase());
  }

  /** Base URL of a registry's API (`https://registry-1.docker.io` for docker.io). */
  baseUrl(registry: string): URL {
    const host = registry === DOCKER_HUB ? DOCKER_HUB_API_HOST : registry;
    return new URL(`${this.allowsHttp(host) ? 'http' : 'https'}://${host}`);
  }

  private pool(origin: string, tls?: HostTls): Pool {
    if (this.closed) throw new GearError('FailedPrecondition', 'registry client is closed');
    const custom = tls && origin.startsWith('https:') && (tls.skipVerify || tls.ca.length > 0);
    const key = custom ? `${origin}#${tls.skipVerify ? 'insecure' : ''}#${caKey(tls)}` : origin;
    let p = this.pools.get(key);
    if (!p) {
      p = new Pool(origin, {
        ...(custom
          ? {
              connect: {
                rejectUnauthorized: !tls.skipVerify,
                ...(tls.ca.length ? { ca: [...rootCertificates, ...tls.ca] } : {}),
              },
            }
          : {}),
        connections: Math.max(1, this.opts.maxConnectionsPerOrigin ?? 6),
        connectTimeout: this.opts.connectTimeoutMs ?? 10_000,
        headersTimeout: this.opts.headersTimeoutMs ?? 30_000,
        bodyTimeout: this.opts.bodyTimeoutMs ?? 30_000,
        keepAliveTimeout: 30_000,
      });
      this.pools.set(key, p);
    }
    return p;
  }

  /** Check that a server-supplied URL may be followed from `from` (scheme, no downgrade). */
  checkFollow(from: URL, to: URL, what: string): void {
    if (to.protocol !== 'https:' && to.protocol !== 'http:') {
      throw unavailable(`${what}: registry sent a Location with unsupported scheme ${to.protocol}`);
    }
    if (to.protocol === 'http:' && from.protocol === 'https:' && !this.allowsHttp(to.host)) {
      throw unavailable(`${what}: refusing redirect from https to plain http (${to.host})`);
    }
    if (to.username || to.password) throw unavailable(`${what}: refusing Location with embedded credentials`);
  }

  private async dockerConfig() {
    const now = Date.now();
    if (!this.configCache || now - this.configCache.at > 5_000) {
      this.configCache = { at: now, value: readDockerConfig(this.configPath) };
    }
    return this.configCache.value;
  }

  /** Credentials for a registry: explicit option first, then config.json (auths, credHelpers, credsStore). */
  async credentials(registry: string): Promise<RegistryCredentials | undefined> {
    const explicit = this.opts.credentials?.[registry];
    if (explicit) return explicit;
    return this.credentialResolver.resolve(await this.dockerConfig(), registry);
  }

  private permissionDenied(registry: string, hadCreds: boolean, status: number, what: string, detail = ''): GearError {
    const d = detail ? ` (${detail})` : '';
    // A helper's answer the registry rejected is asked for again next time.
    if (hadCreds) this.credentialResolver.forget(registry);
    if (!hadCreds) {
      return new GearError(
        'PermissionDenied',
        `${what}: no credentials for registry ${registry}${d}: ${credentialsHint(registry, this.configPath)}`,
      );
    }
    return new GearError(
      'PermissionDenied',
      status === 403
        ? `${what}: registry ${registry} denied access with the configured credentials${d}: check the account's permissions on this repository`
        : `${what}: registry ${registry} rejected the configured credentials${d}: run 'docker login ${registry}' again`,
    );
  }

  /** The Authorization header for a request to the registry's own origin, if one is known. */
  private async authorization(registry: string, scopes: string[], signal?: AbortSignal): Promise<string | undefined> {
    const ch = this.challenges.get(registry);
    if (!ch) return undefined;
    if (ch.scheme === 'basic') {
      const c = await this.credentials(registry);
      return c && c.username !== undefined && c.password !== undefined ? basicAuthorization(c) : undefined;
    }
    const cached = this.tokens.get(registry, scopes);
    if (cached) return `Bearer ${cached}`;
    try {
      const token = await this.fetchToken(registry, ch, scopes, signal);
      return token ? `Bearer ${token}` : undefined;
    } catch (err) {
      // The token fetch was retried with backoff (withRetries) and failed: forget the challenge, so the
      // next request goes to the registry itself and learns its current one (a fixed realm, or no auth
      // any more) instead of failing on the dead realm until a restart.
      if (this.challenges.get(registry) === ch) this.challenges.delete(registry);
      throw err;
    }
  }

  /** Get a bearer token from the realm the registry named (docs: distribution token spec). */
  private async fetchToken(registry: string, ch: AuthChallenge, scopes: string[], signal?: AbortSignal): Promise<string | undefined> {
    const what = `token for registry ${registry}`;
    let realm: URL;
    try {
      realm = new URL(ch.params.realm ?? '');
    } catch {
      throw unavailable(`${what}: registry sent a Bearer challenge without a valid realm`);
    }
    const base = this.bases.get(registry) ?? this.baseUrl(registry);
    this.checkFollow(base, realm, what);
    if (realm.protocol === 'http:' && !this.allowsHttp(realm.host) && base.protocol !== 'http:') {
      throw unavailable(`${what}: refusing to fetch a token over plain http from ${realm.host}`);
    }
    const creds = await this.credentials(registry);
    const service = ch.params.service;
    const headers: Record<string, string> = { 'user-agent': this.userAgent };
    let method: 'GET' | 'POST' = 'GET';
    let body: string | null = null;
    const url = new URL(realm);
    if (creds?.identityToken) {
      method = 'POST';
      const form = new URLSearchParams({ grant_type: 'refresh_token', refresh_token: creds.identityToken, client_id: 'gear' });
      if (service) form.set('service', service);
      if (scopes.length) form.set('scope', scopes.join(' '));
      body = form.toString();
      headers['content-type'] = 'application/x-www-form-urlencoded';
    } else {
      if (service) url.searchParams.set('service', service);
      for (const s of scopes) url.searchParams.append('scope', s);
      if (creds && creds.username !== undefined && creds.password !== undefined) {
        headers.authorization = basicAuthorization(creds);
      }
    }
    const res = await this.withRetries(what, signal, async () => {
      const r = await this.pool(url.origin).request({
        method,
        path: url.pathname + url.search,
        headers,
        body,
        signal: signal ?? null,
      });
      return { status: r.statusCode, headers: r.headers, body: r.body as SendResponse['body'], url };
    });
    if (res.status === 401 || res.status === 403) {
      await res.body.dump();
      throw this.permissionDenied(registry, creds !== undefined, res.status, what, `token server answered ${res.status}`);
    }
    if (res.status !== 200) {
      await res.body.dump();
      throw unavailable(`${what}: token server answered ${res.status}`);
    }
    const text = (await readCapped(res.body, MAX_TOKEN_RESPONSE, what)).toString('utf8');
    let doc: { token?: unknown; access_token?: unknown; expires_in?: unknown; issued_at?: unknown };
    try {
      doc = JSON.parse(text) as typeof doc;
    } catch (err) {
      throw unavailable(`${what}: token response is not JSON`, err);
    }
    const token = typeof doc.token === 'string' ? doc.token : typeof doc.access_token === 'string' ? doc.access_token : '';
    if (!token || /[\r\n]/.test(token)) throw unavailable(`${what}: token response has no usable token`);
    const issued = typeof doc.issued_at === 'string' ? Date.parse(doc.issued_at) : undefined;
    this.tokens.set(registry, scopes, token, typeof doc.expires_in === 'number' ? doc.expires_in : undefined, issued);
    return token;
  }

  get userAgent(): string {
    return this.opts.userAgent ?? 'gear/0.1';
  }

  /**
   * Run `attempt` with bounded retries on 408/429/5xx and retryable network
   * errors. Retryable responses are dumped; the last one is returned when the
   * budget runs out (the caller turns it into an error). Network errors after
   * the budget become Unavailable / DeadlineExceeded.
   */
  async withRetries(
    what: string,
    signal: AbortSignal | undefined,
    attempt: () => Promise<SendResponse>,
    policy: RetryOptions = this.retry,
  ): Promise<SendResponse> {
    const started = Date.now();
    for (let n = 1; ; n++) {
      if (signal?.aborted) throw abortError(signal, what);
      let res: SendResponse | undefined;
      let error: unknown;
      try {
        res = await attempt();
      } catch (err) {
        if (signal?.aborted) throw abortError(signal, what);
        if (err instanceof GearError || !isRetryableNetworkError(err)) {
          if (err instanceof GearError) throw err;
          throw unavailable(`${what}: ${(err as Error)?.message ?? String(err)}`, err);
        }
        error = err;
      }
      if (res && !isRetryableStatus(res.status)) return res;
      const retryAfter = res ? parseRetryAfter(header(res.headers, 'retry-after')) : undefined;
      const delay = nextRetryDelay(n, Date.now() - started, policy, retryAfter);
      if (delay === undefined) {
        if (res) return res;
        const msg = `${what}: ${(error as Error)?.message ?? String(error)} (gave up after ${n} attempt${n > 1 ? 's' : ''})`;
        throw isTimeoutError(error) ? deadlineExceeded(msg, error) : unavailable(msg, error);
      }
      if (res) await res.body.dump().catch(() => undefined);
      await sleep(delay, signal).catch(() => {
        throw abortError(signal!, what);
      });
    }
  }

  /**
   * Send a request to a registry with auth, retries and (for GET/HEAD)
   * redirects. Returns any non-retryable response, including 404; turns
   * 401/403 into PermissionDenied.
   */
  async send(req: SendRequest): Promise<SendResponse> {
    const registryBase = req.base ?? this.baseUrl(req.registry);
    if (req.base && this.bases.get(req.registry)?.href !== req.base.href) {
      if (this.bases.size >= 256) this.bases.clear();
      this.bases.set(req.registry, req.base);
    }
    const release = await this.limiter.acquire(req.signal);
    let handedOver = false;
    try {
      let url = typeof req.url === 'string' && req.url.startsWith('/') ? new URL(req.url, registryBase) : new URL(req.url);
      if (url.origin === registryBase.origin) {
        // fine
      } else {
        this.checkFollow(registryBase, url, req.what);
      }
      let authRetried = false;
      let sentAuth = false;
      for (let hop = 0; hop <= MAX_REDIRECTS; ) {
        const sameOrigin = url.origin === registryBase.origin;
        const target = url;
        const res = await this.withRetries(req.what, req.signal, async () => {
          const headers: Record<string, string> = { 'user-agent': this.userAgent, ...(req.headers ?? {}) };
          sentAuth = false;
          if (sameOrigin) {
            const auth = await this.authorization(req.registry, req.scopes, req.signal);
            if (auth) {
              headers.authorization = auth;
              sentAuth = true;
            }
          }
          const body = req.body ? await req.body() : null;
          const r = await this.pool(target.origin, sameOrigin ? req.tls : undefined).request({
            method: req.method,
            path: target.pathname + target.search,
            headers,
            body,
            signal: req.signal ?? null,
          });
          return { status: r.statusCode, headers: r.headers, body: r.body as SendResponse['body'], url: target };
        }, req.noRetry ? { ...this.retry, maxAttempts: 1 } : this.retry);
        if (res.status === 401 && sameOrigin) {
          await res.body.dump().catch(() => undefined);
          const challenges = parseWWWAuthenticate(res.headers['www-authenticate']);
          const ch = challenges.find((c) => c.scheme === 'bearer') ?? challenges.find((c) => c.scheme === 'basic');
          const creds = await this.credentials(req.registry);
          if (!ch) throw this.permissionDenied(req.registry, creds !== undefined, 401, req.what, 'no usable WWW-Authenticate challenge');
          if (authRetried) throw this.permissionDenied(req.registry, creds !== undefined, 401, req.what);
          authRetried = true;
          this.challenges.set(req.registry, ch);
          if (ch.scheme === 'bearer') {
            if (sentAuth) this.tokens.invalidate(req.registry, req.scopes);
            const extra = ch.params.scope ? ch.params.scope.split(' ').filter((s) => s && !req.scopes.includes(s)) : [];
            if (extra.length) req = { ...req, scopes: [...req.scopes, ...extra] };
          } else if (!creds || creds.username === undefined) {
            throw this.permissionDenied(req.registry, false, 401, req.what);
          } else if (sentAuth) {
            throw this.permissionDenied(req.registry, true, 401, req.what);
          }
          continue;
        }
        if (res.status === 401 || res.status === 403) {
          await res.body.dump().catch(() => undefined);
          const creds = sameOrigin ? await this.credentials(req.registry) : undefined;
          throw this.permissionDenied(req.registry, creds !== undefined, res.status, req.what);
        }
        const location = header(res.headers, 'location');
        if (req.followRedirects && [301, 302, 303, 307, 308].includes(res.status) && location) {
          await res.body.dump().catch(() => undefined);
          let next: URL;
          try {
            next = new URL(location, url);
          } catch (err) {
            throw unavailable(`${req.what}: invalid redirect Location`, err);
          }
          this.checkFollow(url, next, req.what);
          url = next;
          hop++;
          continue;
        }
        handedOver = true;
        let done = false;
        const finish = () => {
          if (done) return;
          done = true;
          release();
        };
        if (res.body.destroyed || res.body.readableEnded) finish();
        else {
          res.body.once('close', finish);
          res.body.once('end', finish);
          res.body.once('error', finish);
        }
        return res;
      }
      throw unavailable(`${req.what}: more than ${MAX_REDIRECTS} redirects`);
    } catch (err) {
      if (err instanceof TypeError && /Invalid URL/.test(err.message)) throw invalidArgument(`${req.what}: bad URL`, err);
      throw err;
    } finally {
      if (!handedOver) release();
    }
  }

  /**
   * Close every pool: gracefully, then (after 2 s: a request still in flight, e.g. one whose body
   * was abandoned after a failed pool write) by destroying it, so that closing never hangs a
   * shutdown. Idempotent.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const pools = [...this.pools.values()];
    this.pools.clear();
    await Promise.allSettled(
      pools.map(async (p) => {
        let timer: NodeJS.Timeout | undefined;
        const late = new Promise<'late'>((r) => (timer = setTimeout(() => r('late'), 2_000)));
        const how = await Promise.race([p.close().then(() => 'closed' as const), late]);
        clearTimeout(timer);
        if (how === 'late') await p.destroy();
      }),
    );
  }
}
