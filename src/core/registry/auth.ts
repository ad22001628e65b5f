/**
 * Registry authentication: WWW-Authenticate parsing, credentials from Docker's
 * config.json, and a token cache.
 *
 * Credential scoping rule (CVE-2020-15157): credentials are looked up by the
 * registry host of the *reference* and are only ever attached to requests to
 * that registry's origin, or to the token realm that registry names in its own
 * 401 challenge. Requests to any other origin (blob redirects to a CDN or
 * object store, descriptor `urls`) carry no Authorization header.
 */
import { readFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { invalidArgument } from '../errors.js';
import { DOCKER_HUB } from './reference.js';

/** One challenge of a WWW-Authenticate header. `scheme` is lowercased; param names too. */
export interface AuthChallenge {
  scheme: string;
  params: Record<string, string>;
}

/** Username/password (the `auth` field of config.json decodes to this) or an OAuth2 refresh token. */
export type RegistryCredentials =
  | { username: string; password: string; identityToken?: undefined }
  | { identityToken: string; username?: string; password?: undefined };

const TOKEN_CHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z]/;

/**
 * Parse a WWW-Authenticate header value (RFC 7235) into challenges. Tolerates
 * several challenges in one header, quoted strings with escapes, token68
 * values and stray whitespace/commas. Never throws; garbage yields fewer
 * challenges. Input is capped at 8 KiB.
 */
export function parseWWWAuthenticate(header: string | string[] | undefined): AuthChallenge[] {
  if (header === undefined) return [];
  if (Array.isArray(header)) return header.flatMap((h) => parseWWWAuthenticate(h));
  const s = header.slice(0, 8192);
  const out: AuthChallenge[] = [];
  let i = 0;
  const n = s.length;
  const skipWs = () => {
    while (i < n && (s[i] === ' ' || s[i] === '\t')) i++;
  };
  const readToken = () => {
    const start = i;
    while (i < n && TOKEN_CHAR.test(s[i]!)) i++;
    return s.slice(start, i);
  };
  let cur: AuthChallenge | undefined;
  for (let guard = 0; i < n && guard < 4096; guard++) {
    skipWs();
    if (s[i] === ',') {
      i++;
      continue;
    }
    const start = i;
    const tok = readToken();
    if (!tok) {
      i++; // skip an unexpected character
      continue;
    }
    skipWs();
    if (s[i] === '=' && cur && !/^=+\s*(,|$)/.test(s.slice(i))) {
      // auth-param: name = token | quoted-string
      i++;
      skipWs();
      let value = '';
      if (s[i] === '"') {
        i++;
        while (i < n && s[i] !== '"') {
          if (s[i] === '\\' && i + 1 < n) i++;
          value += s[i];
          i++;
        }
        i++; // closing quote
      } else {
        const vs = i;
        while (i < n && s[i] !== ',' && s[i] !== ' ' && s[i] !== '\t') i++;
        value = s.slice(vs, i);
      }
      cur.params[tok.toLowerCase()] = value;
      continue;
    }
    if (cur && s[i] === '=') {
      // token68 (e.g. base64 with padding) belonging to the current scheme
      while (i < n && s[i] === '=') i++;
      cur.params[''] = s.slice(start, i);
      continue;
    }
    // A new challenge starts with an auth-scheme token.
    cur = { scheme: tok.toLowerCase(), params: {} };
    out.push(cur);
  }
  return out;
}

/** Key under which config.json stores a registry, normalised to a bare host[:port]. */
export function normalizeConfigKey(key: string): string {
  let k = key.trim();
  k = k.replace(/^[a-z]+:\/\//i, '');
  const slash = k.indexOf('/');
  if (slash >= 0) k = k.slice(0, slash);
  k = k.toLowerCase();
  if (k === 'index.docker.io' || k === 'registry-1.docker.io' || k === 'registry.hub.docker.com') return DOCKER_HUB;
  return k;
}

/** The parts of Docker's config.json the client reads. */
export interface DockerConfigFile {
  auths?: Record<string, { auth?: string; username?: string; password?: string; identitytoken?: string }>;
  credsStore?: string;
  credHelpers?: Record<string, string>;
}

/**
 * Path of Docker's config.json: an explicit path wins, then `$DOCKER_CONFIG/config.json`,
 * then `~/.docker/config.json`.
 */
export function dockerConfigPath(explicit?: string, env: NodeJS.ProcessEnv = process.env): string {
  if (explicit) return explicit;
  if (env.DOCKER_CONFIG) return join(env.DOCKER_CONFIG, 'config.json');
  return join(env.HOME || homedir(), '.docker', 'config.json');
}

/** Read and parse a config.json; a missing file is an empty config. Throws InvalidArgument on bad JSON. */
export async function readDockerConfig(path: string): Promise<DockerConfigFile> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return {};
    throw invalidArgument(`read docker config ${path}`, err);
  }
  try {
    const doc = JSON.parse(text) as unknown;
    if (!doc || typeof doc !== 'object' || Array.isArray(doc)) throw new Error('not an object');
    return doc as DockerConfigFile;
  } catch (err) {
    throw invalidArgument(`docker config ${path} is not valid JSON`, err);
  }
}

/**
 * Credentials for `registry` (host[:port], `docker.io` for Hub) from a parsed
 * config.json, or undefined. Only exact host matches count: credentials of one
 * registry are never offered to another.
 */
export function credentialsFromConfig(config: DockerConfigFile, registry: string): RegistryCredentials | undefined {
  const want = normalizeConfigKey(registry);
  const auths = config.auths && typeof config.auths === 'object' ? config.auths : {};
  for (const [key, entry] of Object.entries(auths)) {
    if (normalizeConfigKey(key) !== want || !entry || typeof entry !== 'object') continue;
    if (typeof entry.identitytoken === 'string' && entry.identitytoken) {
      return { identityToken: entry.identitytoken };
    }
    if (typeof entry.auth === 'string' && entry.auth) {
      const decoded = Buffer.from(entry.auth, 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    }
    if (typeof entry.username === 'string' && typeof entry.password === 'string' && entry.username) {
      return { username: entry.username, password: entry.password };
    }
  }
  return undefined;
}

/** The value of a Basic Authorization header. */
export function basicAuthorization(c: { username: string; password: string }): string {
  return 'Basic ' + Buffer.from(`${c.username}:${c.password}`, 'utf8').toString('base64');
}

/** A bearer token and when it stops being usable (ms since epoch). */
export interface CachedToken {
  token: string;
  expiresAt: number;
}

/**
 * Bearer tokens per (registry, scope set). Tokens are dropped a margin before
 * they expire so a request does not race the expiry. Bounded in size.
 */
export class TokenCache {
  private readonly entries = new Map<string, CachedToken>();
  constructor(
    private readonly now: () => number = Date.now,
    private readonly maxEntries = 1024,
    private readonly marginMs = 10_000,
  ) {}

  static key(registry: string, scopes: readonly string[]): string {
    return `${registry}|${[...scopes].sort().join(' ')}`;
  }

  get(registry: string, scopes: readonly string[]): string | undefined {
    const k = TokenCache.key(registry, scopes);
    const e = this.entries.get(k);
    if (!e) return undefined;
    if (e.expiresAt - this.marginMs <= this.now()) {
      this.entries.delete(k);
      return undefined;
    }
    return e.token;
  }

  /** Store a token valid for `expiresInSec` (the spec's default is 60 s when absent). */
  set(registry: string, scopes: readonly string[], token: string, expiresInSec?: number, issuedAtMs?: number): void {
    const ttl = typeof expiresInSec === 'number' && expiresInSec > 0 ? expiresInSec : 60;
    const issued = issuedAtMs !== undefined && Number.isFinite(issuedAtMs) && issuedAtMs <= this.now() ? issuedAtMs : this.now();
    if (this.entries.size >= this.maxEntries) {
      const oldest = this.entries.keys().next().value;
      if (oldest !== undefined) this.entries.delete(oldest);
    }
    this.entries.set(TokenCache.key(registry, scopes), { token, expiresAt: issued + ttl * 1000 });
  }

  /** Forget a token the registry rejected. */
  invalidate(registry: string, scopes: readonly string[]): void {
    this.entries.delete(TokenCache.key(registry, scopes));
  }
}

/** The scope string for a repository: `repository:<name>:pull` or `…:pull,push`. */
export function repositoryScope(repository: string, push: boolean): string {
  return `repository:${repository}:${push ? 'pull,push' : 'pull'}`;
}

/** The hint in PermissionDenied errors: how to give the client credentials for `registry`. */
export function credentialsHint(registry: string, configPath: string): string {
  return (
    `run 'docker login ${registry}' or set DOCKER_CONFIG to a directory whose config.json has ` +
    `an "auths" entry, a "credHelpers" entry or a "credsStore" for ${registry} (looked in ${configPath})`
  );
}
