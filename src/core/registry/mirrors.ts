/**
 * Mirror failover for pulls: a read (manifest, blob, range) is tried on the
 * registry's mirrors in order, then on the registry itself (hosts.ts says
 * which). A mirror that fails (refused, 5xx, timeout, wrong bytes, 401/403,
 * 404) hands the request to the next host; the caller's deadline is shared,
 * and a mirror gets at most `mirrorTimeoutMs` to answer with headers, so a
 * stalled mirror cannot eat it. A mirror that failed (other than 404: a
 * pull-through cache or a P2P proxy lacks content routinely) is put behind
 * the origin for a while (a circuit breaker with a bounded backoff), so not
 * every fetch pays for a dead mirror.
 *
 * Requests to a mirror carry `?ns=<registry>` (as containerd sends it:
 * Dragonfly, Spegel and containerd-aware caches route by it) and the mirror's
 * own credentials (docker login <mirror>, a credential helper for it).
 */
import { GearError, notFound } from '../errors.js';
import { DOCKER_HUB, DOCKER_HUB_API_HOST } from './reference.js';
import type { HostsConfig, RegistryHost } from './hosts.js';

/** One way to reach a registry for one request. */
export interface HostRoute {
  host: RegistryHost;
  role: 'mirror' | 'origin';
  /** Key of credentials, tokens and challenges: the registry for its origin, else the host's host[:port]. */
  authKey: string;
  /** The base origin the transport sends to (auth goes only there). */
  base: URL;
  /** The request path for an API path below /v2 (`/a/b/manifests/x`), with `?ns=` for mirrors. */
  path(apiPath: string): string;
}

export type RouteOutcome = 'ok' | 'not_found' | 'failed';

export interface RouteCounters {
  mirror: Record<RouteOutcome, number>;
  origin: Record<RouteOutcome, number>;
  /** Times a request moved on from a failed mirror to the next host. */
  fallthroughs: number;
}

export interface MirrorRouterOptions {
  /** Longest wait for a mirror's response headers. Default 5 s. */
  mirrorTimeoutMs?: number;
  /** First backoff of the circuit breaker. Default 10 s; doubles per failure up to `maxOpenMs`. */
  openMs?: number;
  /** Longest time a failed mirror is put behind the origin. Default 5 min. */
  maxOpenMs?: number;
  now?: () => number;
}

const MAX_BREAKERS = 256;

interface Breaker {
  failures: number;
  until: number;
}

function sameHostIsOrigin(registry: string, host: RegistryHost): boolean {
  const h = host.api.host.toLowerCase();
  return h === registry || (registry === DOCKER_HUB && h === DOCKER_HUB_API_HOST);
}

export function routeFor(registry: string, host: RegistryHost): HostRoute {
  const base = new URL(host.api.origin);
  const prefix = host.api.pathname.replace(/\/+$/, '');
  const isOrigin = host.role === 'origin';
  const proxy = !sameHostIsOrigin(registry, host);
  return {
    host,
    role: host.role,
    authKey: isOrigin && sameHostIsOrigin(registry, host) ? registry : host.api.host.toLowerCase(),
    base,
    path(apiPath: string) {
      const p = prefix + apiPath;
      if (!proxy) return p;
      return `${p}${p.includes('?') ? '&' : '?'}ns=${encodeURIComponent(registry)}`;
    },
  };
}

/** Is this error a 404 (the host lacks the content)? */
function isNotFound(err: unknown): boolean {
  return err instanceof GearError && err.class === 'NotFound';
}

export class MirrorRouter {
  private readonly breakers = new Map<string, Breaker>();
  readonly counters: RouteCounters = {
    mirror: { ok: 0, not_found: 0, failed: 0 },
    origin: { ok: 0, not_found: 0, failed: 0 },
    fallthroughs: 0,
  };
  private readonly mirrorTimeoutMs: number;
  private readonly openMs: number;
  private readonly maxOpenMs: number;
  private readonly now: () => number;

  constructor(
    readonly hosts: HostsConfig,
    opts: MirrorRouterOptions = {},
  ) {
    this.mirrorTimeoutMs = opts.mirrorTimeoutMs ?? 5_000;
    this.openMs = opts.openMs ?? 10_000;
    this.maxOpenMs = opts.maxOpenMs ?? 300_000;
    this.now = opts.now ?? Date.now;
  }

  /** The routes of a registry for a capability, in the order to try: healthy mirrors, the origin, mirrors whose breaker is open. */
  async routes(registry: string, capability: 'pull' | 'resolve'): Promise<HostRoute[]> {
    const hosts = await this.hosts.hosts(registry);
    const now = this.now();
    const healthy: HostRoute[] = [];
    const benched: HostRoute[] = [];
    let origin: HostRoute[] = [];
    for (const h of hosts) {
      if (!h.capabilities[capability]) continue;
      const r = routeFor(registry, h);
      if (h.role === 'origin') origin.push(r);
      else if ((this.breakers.get(h.api.href)?.until ?? 0) > now) benched.push(r);
      else healthy.push(r);
    }
    // The origin (the server, last in hosts.toml) always serves: without the capability it would be a config that cannot pull.
    if (origin.length === 0) origin = [routeFor(registry, hosts[hosts.length - 1]!)];
    return [...healthy, ...origin, ...benched];
  }

  /** A mirror failed: put it behind the origin for a while (doubling, bounded). */
  markFailed(host: RegistryHost): void {
    if (host.role !== 'mirror') return;
    const key = host.api.href;
    const b = this.breakers.get(key) ?? { failures: 0, until: 0 };
    b.failures = Math.min(b.failures + 1, 30);
    b.until = this.now() + Math.min(this.maxOpenMs, this.openMs * 2 ** (b.failures - 1));
    if (!this.breakers.has(key) && this.breakers.size >= MAX_BREAKERS) {
      const oldest = this.breakers.keys().next().value;
      if (oldest !== undefined) this.breakers.delete(oldest);
    }
    this.breakers.set(key, b);
  }

  markOk(host: RegistryHost): void {
    if (host.role === 'mirror') this.breakers.delete(host.api.href);
  }

  /** Is this mirror benched now? (tests, status) */
  isBenched(host: RegistryHost): boolean {
    return (this.breakers.get(host.api.href)?.until ?? 0) > this.now();
  }

  count(role: 'mirror' | 'origin', outcome: RouteOutcome): void {
    this.counters[role][outcome]++;
  }

  /**
   * Run `attempt` on each route in turn until one succeeds. Mirror failures
   * fall through (the last error of a mirror is kept for the message); the
   * origin's error is final. A mirror attempt gets a signal that also fires
   * after `mirrorTimeoutMs` unless `attempt` calls `answered()` (headers
   * arrived: the body then has the transport's idle timeout).
   */
  async run<T>(
    registry: string,
    capability: 'pull' | 'resolve',
    signal: AbortSignal | undefined,
    what: string,
    attempt: (route: HostRoute, signal: AbortSignal | undefined, answered: () => void) => Promise<T>,
  ): Promise<T> {
    const routes = await this.routes(registry, capability);
    const mirrorErrors: string[] = [];
    for (const route of routes) {
      if (route.role === 'origin') {
        try {
          const v = await attempt(route, signal, () => undefined);
          this.count('origin', 'ok');
          return v;
        } catch (err) {
          this.count('origin', isNotFound(err) ? 'not_found' : 'failed');
          if (mirrorErrors.length && err instanceof GearError) {
            err.message = `${err.message} (mirrors tried first: ${mirrorErrors.join('; ')})`.slice(0, 2000);
          }
          throw err;
        }
      }
      if (signal?.aborted) break;
      const timer = new AbortController();
      const t = setTimeout(
        () => timer.abort(new DOMException(`mirror ${route.base.host} did not answer within ${this.mirrorTimeoutMs} ms`, 'TimeoutError')),
        this.mirrorTimeoutMs,
      );
      const s = signal ? AbortSignal.any([signal, timer.signal]) : timer.signal;
      try {
        const v = await attempt(route, s, () => clearTimeout(t));
        clearTimeout(t);
        this.markOk(route.host);
        this.count('mirror', 'ok');
        return v;
      } catch (err) {
        clearTimeout(t);
        if (signal?.aborted) throw err;
        const nf = isNotFound(err);
        this.count('mirror', nf ? 'not_found' : 'failed');
        if (!nf) this.markFailed(route.host);
        this.counters.fallthroughs++;
        const msg = timer.signal.aborted ? String((timer.signal.reason as Error).message) : err instanceof Error ? err.message : String(err);
        mirrorErrors.push(`${route.base.host}: ${msg.slice(0, 300)}`);
      }
    }
    // Every route was a mirror (cannot happen: routes() always has the origin) or the caller aborted.
    if (signal?.aborted) throw signal.reason;
    throw notFound(`${what}: no host could serve it (${mirrorErrors.join('; ')})`);
  }
}
