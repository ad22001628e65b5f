/**
 * Registry host configuration: which hosts (mirrors, then the registry
 * itself) serve a registry's pulls, read from containerd's `hosts.toml`
 * layout and Docker's `registry-mirrors` list.
 *
 * Layout (containerd, docs/hosts.md): `<dir>/<host[:port]>/hosts.toml` (a
 * `host:port` registry may also use the directory `host_port_`), else
 * `<dir>/_default/hosts.toml`:
 * ```toml
 * server = "https://registry-1.docker.io"      # the registry itself (optional)
 * [host."https://mirror.lan:5000"]
 *   capabilities = ["pull", "resolve"]
 *   skip_verify = false
 *   ca = "mirror-ca.crt"                        # relative to the host directory
 *   override_path = false                        # true: the URL's path is the API root (no /v2 added)
 *   [host."https://mirror.lan:5000".header]
 *     x-custom = "1"
 * ```
 * Hosts are tried in file order, the `server` (default: the registry) last.
 *
 * The file is input from outside: it is size-capped, URLs are checked
 * (http/https only, no credentials, query or fragment), counts and header
 * values are bounded, and every error names the file and the line.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { parse as parseToml, TomlError } from 'smol-toml';
import { GearError, invalidArgument } from '../errors.js';
import { DOCKER_HUB, DOCKER_HUB_API_HOST } from './reference.js';

export const DEFAULT_REGISTRY_CONFIG_DIR = '/etc/containerd/certs.d';

const MAX_HOSTS_FILE = 64 << 10;

/** A hosts.toml's text; undefined when there is none (missing, or not a regular file). Bounded; unreadable is an error naming it. */
async function readHostsFile(file: string): Promise<string | undefined> {
  try {
    const st = await stat(file);
    if (!st.isFile()) return undefined;
    if (st.size > MAX_HOSTS_FILE) throw invalidArgument(`${file}: larger than ${MAX_HOSTS_FILE} bytes`);
    return await readFile(file, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return undefined;
    if (err instanceof GearError) throw err;
    throw invalidArgument(`${file}: cannot read: ${(err as Error).message}`);
  }
}
const MAX_HOSTS = 16;
const MAX_URL = 2048;
const MAX_HEADERS = 32;
const MAX_HEADER_VALUE = 4096;
const MAX_CA_FILES = 8;
const MAX_CA_BYTES = 1 << 20;
const MAX_MIRROR_FLAGS = 16;
/** Headers a hosts.toml may not set: the transport owns them. */
const RESERVED_HEADERS = new Set(['host', 'content-length', 'transfer-encoding', 'connection', 'keep-alive', 'upgrade', 'te', 'trailer', 'range']);

export interface HostCapabilities {
  pull: boolean;
  resolve: boolean;
  push: boolean;
}

/** One host that serves a registry's API. */
export interface RegistryHost {
  /** The API root without a trailing slash, e.g. `https://mirror.lan/v2`. */
  api: URL;
  /** mirror: a host other than the registry; origin: the registry itself (or its `server`). */
  role: 'mirror' | 'origin';
  capabilities: HostCapabilities;
  /** Do not verify the host's TLS certificate. */
  skipVerify: boolean;
  /** PEM CA certificates (contents) the host's certificate is checked against, besides the system's. */
  ca: string[];
  /** Extra request headers. */
  headers: Record<string, string[]>;
  /** Where this host came from, for messages: a hosts.toml path, `--registry-mirror`, or `default`. */
  source: string;
}

/** Position of the first occurrence of `needle` in `text` as "line N", for error messages. */
function lineOf(text: string, needle: string): string {
  const i = text.indexOf(needle);
  if (i < 0) return '';
  return `:${text.slice(0, i).split('\n').length}`;
}

function fail(file: string, text: string, needle: string, msg: string): GearError {
  return invalidArgument(`${file}${lineOf(text, needle)}: ${msg}`);
}

/**
 * Parse a host URL as containerd does: no scheme means https; a path gets
 * `/v2` appended unless it ends in `/v2` or `overridePath` is set.
 * Throws a plain Error with the reason (the caller adds the file and line).
 */
export function parseHostUrl(raw: string, overridePath: boolean): URL {
  if (raw.length > MAX_URL) throw new Error(`URL longer than ${MAX_URL} characters`);
  if (/[\s\x00-\x1f\x7f]/.test(raw)) throw new Error(`URL ${JSON.stringify(raw.slice(0, 100))} contains spaces or control characters`);
  const text = /^[a-zA-Z][a-zA-Z0-9+.-]*:\/\//.test(raw) ? raw : `https://${raw}`;
  let u: URL;
  try {
    u = new URL(text);
  } catch {
    throw new Error(`${JSON.stringify(raw.slice(0, 100))} is not a valid URL`);
  }
  if (u.protocol !== 'https:' && u.protocol !== 'http:') throw new Error(`URL ${JSON.stringify(raw.slice(0, 100))}: only http:// and https:// are supported`);
  if (u.username || u.password) throw new Error(`URL ${u.host}: credentials in the URL are refused (use docker login or a credential helper for ${u.host})`);
  if (u.search || u.hash) throw new Error(`URL ${JSON.stringify(raw.slice(0, 100))}: a query or fragment is not allowed`);
  if (!u.hostname) throw new Error(`URL ${JSON.stringify(raw.slice(0, 100))} has no host`);
  let p = path.posix.normalize(u.pathname || '/').replace(/\/+$/, '');
  if (p.split('/').includes('..')) throw new Error(`URL ${JSON.stringify(raw.slice(0, 100))}: '..' in the path`);
  if (!overridePath && !p.endsWith('/v2')) p = `${p}/v2`;
  u.pathname = p || '/';
  return u;
}

function checkHeaders(value: unknown, file: string, text: string, key: string): Record<string, string[]> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw fail(file, text, key, `"header" of ${key} must be a table of name = "value" or ["values"]`);
  const out: Record<string, string[]> = {};
  const entries = Object.entries(value as Record<string, unknown>);
  if (entries.length > MAX_HEADERS) throw fail(file, text, key, `more than ${MAX_HEADERS} headers for ${key}`);
  for (const [name, v] of entries) {
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$/.test(name)) throw fail(file, text, name, `invalid header name ${JSON.stringify(name.slice(0, 100))}`);
    if (RESERVED_HEADERS.has(name.toLowerCase())) throw fail(file, text, name, `header ${name} cannot be set in hosts.toml`);
    const values = Array.isArray(v) ? v : [v];
    if (values.length === 0 || values.length > 16) throw fail(file, text, name, `header ${name}: give 1 to 16 values`);
    for (const x of values) {
      if (typeof x !== 'string') throw fail(file, text, name, `header ${name}: values must be strings`);
      if (x.length > MAX_HEADER_VALUE || /[\r\n\x00]/.test(x)) throw fail(file, text, name, `header ${name}: value too long or contains a line break`);
    }
    out[name.toLowerCase()] = values as string[];
  }
  return out;
}

function checkCapabilities(value: unknown, file: string, text: string, key: string): HostCapabilities {
  if (value === undefined) return { pull: true, resolve: true, push: true };
  if (!Array.isArray(value) || value.length > 3) throw fail(file, text, key, `"capabilities" of ${key} must be a list of "pull", "resolve", "push"`);
  const caps: HostCapabilities = { pull: false, resolve: false, push: false };
  for (const c of value) {
    const s = typeof c === 'string' ? c.toLowerCase() : '';
    if (s !== 'pull' && s !== 'resolve' && s !== 'push') throw fail(file, text, String(c), `unknown capability ${JSON.stringify(String(c).slice(0, 50))} (want "pull", "resolve" or "push")`);
    caps[s] = true;
  }
  return caps;
}

async function readCa(value: unknown, baseDir: string, file: string, text: string, key: string): Promise<string[]> {
  if (value === undefined) return [];
  const list = Array.isArray(value) ? value : [value];
  if (list.length > MAX_CA_FILES) throw fail(file, text, 'ca', `more than ${MAX_CA_FILES} CA files for ${key}`);
  const out: string[] = [];
  for (const p of list) {
    if (typeof p !== 'string' || p === '' || p.includes('\0')) throw fail(file, text, 'ca', `"ca" of ${key} must be a path or a list of paths`);
    const abs = path.isAbsolute(p) ? p : path.join(baseDir, p);
    let pem: Buffer;
    try {
      const st = await stat(abs);
      if (!st.isFile() || st.size > MAX_CA_BYTES) throw new Error(`not a file of at most ${MAX_CA_BYTES} bytes`);
      pem = await readFile(abs);
    } catch (err) {
      throw fail(file, text, p, `cannot read CA file ${abs}: ${(err as Error).message}`);
    }
    if (!pem.toString('latin1').includes('-----BEGIN CERTIFICATE-----')) throw fail(file, text, p, `CA file ${abs} holds no PEM certificate`);
    out.push(pem.toString('latin1'));
  }
  return out;
}

const HOST_KEYS = new Set(['capabilities', 'skip_verify', 'ca', 'client', 'override_path', 'header', 'dial_timeout']);

async function parseHostEntry(
  urlText: string,
  cfg: Record<string, unknown>,
  role: RegistryHost['role'],
  file: string,
  text: string,
  baseDir: string,
): Promise<RegistryHost> {
  for (const k of Object.keys(cfg)) {
    if (!HOST_KEYS.has(k)) throw fail(file, text, k, `unknown setting ${JSON.stringify(k.slice(0, 50))} for ${urlText.slice(0, 100)}`);
  }
  if (cfg.client !== undefined) throw fail(file, text, 'client', `"client" (TLS client certificates) is not supported by Gear for ${urlText.slice(0, 100)}`);
  if (cfg.override_path !== undefined && typeof cfg.override_path !== 'boolean') throw fail(file, text, 'override_path', '"override_path" must be true or false');
  if (cfg.skip_verify !== undefined && typeof cfg.skip_verify !== 'boolean') throw fail(file, text, 'skip_verify', '"skip_verify" must be true or false');
  let api: URL;
  try {
    api = parseHostUrl(urlText, cfg.override_path === true);
  } catch (err) {
    throw fail(file, text, urlText, (err as Error).message);
  }
  return {
    api,
    role,
    capabilities: checkCapabilities(cfg.capabilities, file, text, urlText),
    skipVerify: cfg.skip_verify === true,
    ca: await readCa(cfg.ca, baseDir, file, text, urlText),
    headers: cfg.header === undefined ? {} : checkHeaders(cfg.header, file, text, urlText),
    source: file,
  };
}

/** The default origin host of a registry (docker.io → registry-1.docker.io; loopback and insecure → http). */
export function defaultOrigin(registry: string, allowsHttp: (hostPort: string) => boolean): RegistryHost {
  const host = registry === DOCKER_HUB ? DOCKER_HUB_API_HOST : registry;
  return {
    api: new URL(`${allowsHttp(host) ? 'http' : 'https'}://${host}/v2`),
    role: 'origin',
    capabilities: { pull: true, resolve: true, push: true },
    skipVerify: false,
    ca: [],
    headers: {},
    source: 'default',
  };
}

/**
 * Parse one hosts.toml (its text) for `registry`: the mirrors in order, then
 * the origin (`server`, default the registry). `baseDir` resolves relative
 * `ca` paths. Throws InvalidArgument naming `file` and the line.
 */
export async function parseHostsToml(
  text: string,
  file: string,
  baseDir: string,
  origin: RegistryHost,
): Promise<RegistryHost[]> {
  if (Buffer.byteLength(text) > MAX_HOSTS_FILE) throw invalidArgument(`${file}: larger than ${MAX_HOSTS_FILE} bytes`);
  let doc: Record<string, unknown>;
  try {
    doc = parseToml(text) as Record<string, unknown>;
  } catch (err) {
    if (err instanceof TomlError) {
      throw invalidArgument(`${file}:${err.line}:${err.column}: invalid TOML: ${err.message.split('\n')[0]}`);
    }
    throw invalidArgument(`${file}: invalid TOML: ${(err as Error).message}`);
  }
  const hosts: RegistryHost[] = [];
  const top = new Set(['server', 'host', ...HOST_KEYS]);
  for (const k of Object.keys(doc)) {
    if (!top.has(k)) throw fail(file, text, k, `unknown setting ${JSON.stringify(k.slice(0, 50))} (want server, [host."URL"] tables and host settings)`);
  }
  const table = doc.host;
  if (table !== undefined) {
    if (typeof table !== 'object' || table === null || Array.isArray(table)) throw fail(file, text, 'host', '"host" must be tables [host."https://mirror"]');
    const entries = Object.entries(table as Record<string, unknown>);
    if (entries.length > MAX_HOSTS) throw invalidArgument(`${file}: more than ${MAX_HOSTS} hosts`);
    for (const [urlText, cfg] of entries) {
      if (typeof cfg !== 'object' || cfg === null || Array.isArray(cfg)) throw fail(file, text, urlText, `[host.${JSON.stringify(urlText.slice(0, 100))}] must be a table`);
      hosts.push(await parseHostEntry(urlText, cfg as Record<string, unknown>, 'mirror', file, text, baseDir));
    }
  }
  // The top level holds the server's own settings (containerd: server, capabilities, ca, skip_verify, header, …).
  const serverCfg = Object.fromEntries(Object.entries(doc).filter(([k]) => k !== 'server' && k !== 'host'));
  if (doc.server !== undefined) {
    if (typeof doc.server !== 'string') throw fail(file, text, 'server', '"server" must be a URL string');
    const server = await parseHostEntry(doc.server, serverCfg, 'origin', file, text, baseDir);
    hosts.push(server);
  } else {
    const o = Object.keys(serverCfg).length ? await parseHostEntry(origin.api.origin + origin.api.pathname.replace(/\/v2$/, ''), serverCfg, 'origin', file, text, baseDir) : origin;
    hosts.push(o);
  }
  // A host equal to the origin is the origin (a hosts.toml naming the registry itself as a "mirror").
  const last = hosts[hosts.length - 1]!;
  for (const h of hosts) if (h !== last && h.api.href === last.api.href) h.role = 'origin';
  return hosts;
}

/** Docker's daemon.json `registry-mirrors` (or `--registry-mirror`): mirror hosts for Docker Hub. */
export function dockerHubMirrors(urls: string[], source = '--registry-mirror'): RegistryHost[] {
  if (urls.length > MAX_MIRROR_FLAGS) throw invalidArgument(`${source}: more than ${MAX_MIRROR_FLAGS} mirrors`);
  return urls.map((raw) => {
    let api: URL;
    try {
      api = parseHostUrl(raw.trim(), false);
    } catch (err) {
      throw invalidArgument(`${source}: ${(err as Error).message}`);
    }
    return { api, role: 'mirror', capabilities: { pull: true, resolve: true, push: false }, skipVerify: false, ca: [], headers: {}, source } satisfies RegistryHost;
  });
}

/** The directories containerd looks in for a registry's hosts.toml, in order. */
export function hostDirCandidates(root: string, registry: string): string[] {
  const out: string[] = [];
  const i = registry.lastIndexOf(':');
  if (i > 0 && !registry.endsWith(']')) out.push(path.join(root, `${registry.slice(0, i)}_${registry.slice(i + 1)}_`));
  out.push(path.join(root, registry), path.join(root, '_default'));
  return out;
}

export interface HostsConfigOptions {
  /** containerd-style config directory; undefined or '' = none. */
  configDir?: string | undefined;
  /** Docker Hub mirrors (Docker's registry-mirrors). */
  dockerHubMirrors?: string[] | undefined;
  /** May this host[:port] be reached over http:// (the default origin's scheme). */
  allowsHttp: (hostPort: string) => boolean;
  /** How long a read hosts.toml is used before it is read again. Default 10 s. */
  ttlMs?: number;
}

/**
 * The hosts of each registry: hosts.toml (re-read every few seconds, so edits
 * apply without a restart), Docker Hub mirrors, else the registry alone.
 */
export class HostsConfig {
  private readonly cache = new Map<string, { at: number; value: Promise<RegistryHost[]> }>();
  private readonly hub: RegistryHost[];
  private readonly ttl: number;

  constructor(private readonly opts: HostsConfigOptions) {
    this.hub = dockerHubMirrors(opts.dockerHubMirrors ?? []);
    this.ttl = opts.ttlMs ?? 10_000;
  }


  hosts(registry: string): Promise<RegistryHost[]> {
    const key = registry.toLowerCase();
    const now = Date.now();
    const hit = this.cache.get(key);
    if (hit && now - hit.at < this.ttl) return hit.value;
    const value = this.load(key);
    if (this.cache.size >= 256) this.cache.clear();
    this.cache.set(key, { at: now, value });
    // A failed read is not kept: the next fetch reads the (perhaps fixed) file again.
    value.catch(() => {
      if (this.cache.get(key)?.value === value) this.cache.delete(key);
    });
    return value;
  }

  private async load(registry: string): Promise<RegistryHost[]> {
    const origin = defaultOrigin(registry, this.opts.allowsHttp);
    let hosts = [origin];
    const dir = this.opts.configDir;
    if (dir) {
      for (const d of hostDirCandidates(dir, registry)) {
        const file = path.join(d, 'hosts.toml');
        const text = await readHostsFile(file);
        if (text === undefined) continue;
        hosts = await parseHostsToml(text, file, d, origin);
        break;
      }
    }
    if (registry === DOCKER_HUB && this.hub.length) hosts = [...hosts.slice(0, -1), ...this.hub, hosts[hosts.length - 1]!];
    return hosts;
  }

  /** Read every hosts.toml under the config dir (at start: a broken file fails the start, naming it). */
  async validate(registries?: string[]): Promise<number> {
    const dir = this.opts.configDir;
    if (!dir) return 0;
    let names: string[];
    try {
      names = registries ?? (await readdir(dir)).slice(0, 1000);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
      throw invalidArgument(`registry config dir ${dir}: ${(err as Error).message}`);
    }
    let n = 0;
    for (const name of names) {
      const file = path.join(dir, name, 'hosts.toml');
      const text = await readHostsFile(file);
      if (text === undefined) continue;
      const registry = name === '_default' ? 'example.invalid' : name.replace(/^(.*)_([0-9]+)_$/, '$1:$2');
      await parseHostsToml(text, file, path.join(dir, name), defaultOrigin(registry, this.opts.allowsHttp));
      n++;
    }
    return n;
  }
}
