/**
 * Registry credentials as Docker resolves them: the `auths` entry of
 * config.json, then `credHelpers[registry]`, then `credsStore`. A helper is the
 * program `docker-credential-<name>`, run as `docker-credential-<name> get`
 * with the server address on stdin; it answers
 * `{"ServerURL": …, "Username": …, "Secret": …}` on stdout (the protocol of
 * docker/docker-credential-helpers). A Username of `<token>` means Secret is an
 * identity (OAuth2 refresh) token.
 *
 * Everything a helper prints is hostile input: output and run time are bounded,
 * and an answer that is not the protocol's JSON is an error that names the
 * helper. A helper that has no credentials for the registry (it says
 * "credentials not found") is not an error: the lookup goes on, and ends in no
 * credentials.
 */
import { spawn } from 'node:child_process';
import { invalidArgument, unavailable } from '../errors.js';
import { credentialsFromConfig, normalizeConfigKey, type DockerConfigFile, type RegistryCredentials } from './auth.js';
import { DOCKER_HUB } from './reference.js';

/** A helper name as config.json gives it: `docker-credential-<name>` must be a plain program name. */
const HELPER_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** What a helper may print; real answers are a few hundred bytes. */
const MAX_OUTPUT = 64 * 1024;
/** The server address Docker gives helpers for Docker Hub. */
const DOCKER_HUB_SERVER = 'https://index.docker.io/v1/';

export interface HelperOptions {
  /** Kill a helper that has not answered after this long. Default 30 s. */
  timeoutMs?: number;
  /** Environment of the helper (PATH finds it). Default: this process's. */
  env?: NodeJS.ProcessEnv;
}

/** The helper config.json names for `registry`, and through which key. */
export function helperFor(config: DockerConfigFile, registry: string): { helper: string; via: 'credHelpers' | 'credsStore' } | undefined {
  const want = normalizeConfigKey(registry);
  const helpers = config.credHelpers && typeof config.credHelpers === 'object' && !Array.isArray(config.credHelpers) ? config.credHelpers : {};
  for (const [key, name] of Object.entries(helpers)) {
    if (normalizeConfigKey(key) === want && typeof name === 'string' && name) return { helper: name, via: 'credHelpers' };
  }
  if (typeof config.credsStore === 'string' && config.credsStore) return { helper: config.credsStore, via: 'credsStore' };
  return undefined;
}

/** The server address a helper is asked about: the registry host, or Docker Hub's legacy URL. */
export function helperServerAddress(registry: string): string {
  return normalizeConfigKey(registry) === DOCKER_HUB ? DOCKER_HUB_SERVER : normalizeConfigKey(registry);
}

/**
 * Run `docker-credential-<helper> get` for `registry`. Undefined when the helper
 * says it has no credentials for it.
 */
export async function runCredentialHelper(
  helper: string,
  registry: string,
  opts: HelperOptions = {},
  via: 'credHelpers' | 'credsStore' = 'credHelpers',
): Promise<RegistryCredentials | undefined> {
  const program = `docker-credential-${helper}`;
  const where = `credential helper ${program} (config.json ${via}) for registry ${registry}`;
  if (!HELPER_NAME.test(helper)) {
    throw invalidArgument(`${where}: "${helper.slice(0, 80)}" is not a helper name (letters, digits, '.', '_', '-'; no path)`);
  }
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const r = await runBounded(program, ['get'], helperServerAddress(registry), timeoutMs, opts.env ?? process.env);
  if (r.spawnError) {
    const code = (r.spawnError as NodeJS.ErrnoException).code;
    throw unavailable(
      code === 'ENOENT'
        ? `${where}: ${program} is not installed or not on PATH: install it, or remove "${helper}" from config.json's ${via}`
        : `${where}: cannot run ${program}: ${r.spawnError.message}`,
    );
  }
  if (r.timedOut) throw unavailable(`${where}: ${program} did not answer within ${timeoutMs >= 1000 ? `${Math.round(timeoutMs / 1000)} s` : `${timeoutMs} ms`} (killed)`);
  if (r.overflow) throw unavailable(`${where}: ${program} printed more than ${MAX_OUTPUT} bytes`);
  const out = r.stdout.trim();
  if (r.code !== 0) {
    // The helpers' protocol: "credentials not found in native keychain" on stdout, exit 1.
    if (/credentials not found/i.test(out) || /credentials not found/i.test(r.stderr)) return undefined;
    const said = (r.stderr.trim() || out).slice(0, 500);
    throw unavailable(`${where}: ${program} get failed (exit ${r.code ?? r.signal})${said ? `: ${said}` : ''}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(out);
  } catch {
    throw unavailable(`${where}: ${program} get did not print JSON (${JSON.stringify(out.slice(0, 80))})`);
  }
  if (!doc || typeof doc !== 'object' || Array.isArray(doc)) throw unavailable(`${where}: ${program} get printed no JSON object`);
  const { Username: username, Secret: secret } = doc as { Username?: unknown; Secret?: unknown };
  if (typeof secret !== 'string' || (username !== undefined && typeof username !== 'string')) {
    throw unavailable(`${where}: ${program} get printed no string "Secret" (and "Username")`);
  }
  if (!secret) return undefined;
  if (username === '<token>') return { identityToken: secret };
  if (!username) throw unavailable(`${where}: ${program} get printed a Secret without a Username`);
  return { username, password: secret };
}

interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  overflow: boolean;
  spawnError?: Error;
}

/** Run a program with `input` on stdin; output and time bounded; never rejects. */
function runBounded(program: string, args: string[], input: string, timeoutMs: number, env: NodeJS.ProcessEnv): Promise<RunResult> {
  return new Promise((resolve) => {
    // Its own process group, so a kill also ends what a helper script started (which would hold the pipes open).
    const child = spawn(program, args, { env, stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    const killAll = () => {
      try {
        if (child.pid) process.kill(-child.pid, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    };
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let size = 0;
    let timedOut = false;
    let overflow = false;
    let spawnError: Error | undefined;
    const collect = (into: Buffer[]) => (c: Buffer) => {
      size += c.length;
      if (size > MAX_OUTPUT) {
        overflow = true;
        killAll();
        return;
      }
      into.push(c);
    };
    child.stdout.on('data', collect(out));
    child.stderr.on('data', collect(err));
    const timer = setTimeout(() => {
      timedOut = true;
      killAll();
    }, timeoutMs);
    child.on('error', (e) => {
      spawnError = e;
    });
    // A helper that exits without reading stdin makes the write fail with EPIPE: not our error.
    child.stdin.on('error', () => {});
    child.stdin.end(input);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        timedOut,
        overflow,
        ...(spawnError ? { spawnError } : {}),
      });
    });
  });
}

/**
 * Credentials for a registry from a parsed config.json: `auths` first, then the
 * registry's credential helper, then the credential store; undefined when none
 * has any. A failing helper throws Unavailable naming it, with its own message;
 * an impossible helper name is InvalidArgument.
 *
 * With a short memory: a helper (a cloud login, a keychain)
 * can take a second, and the registry client asks for each request. Answers are
 * kept for `ttlMs` per registry; a failure is never kept, so the next request
 * asks the helper again.
 */
export class CredentialResolver {
  private readonly answers = new Map<string, { at: number; value: Promise<RegistryCredentials | undefined> }>();
  constructor(
    private readonly opts: HelperOptions & { ttlMs?: number; now?: () => number } = {},
  ) {}

  resolve(config: DockerConfigFile, registry: string): Promise<RegistryCredentials | undefined> {
    const fromFile = credentialsFromConfig(config, registry);
    if (fromFile) return Promise.resolve(fromFile);
    const h = helperFor(config, registry);
    if (!h) return Promise.resolve(undefined);
    const now = (this.opts.now ?? Date.now)();
    const key = `${h.helper}\0${normalizeConfigKey(registry)}`;
    const hit = this.answers.get(key);
    if (hit && now - hit.at < (this.opts.ttlMs ?? 60_000)) return hit.value;
    const value = runCredentialHelper(h.helper, registry, this.opts, h.via);
    if (this.answers.size >= 256) this.answers.clear();
    this.answers.set(key, { at: now, value });
    value.catch(() => {
      if (this.answers.get(key)?.value === value) this.answers.delete(key);
    });
    return value;
  }

  /** Forget what a helper said for `registry` (the registry rejected it). */
  forget(registry: string): void {
    const want = normalizeConfigKey(registry);
    for (const k of this.answers.keys()) if (k.endsWith(`\0${want}`)) this.answers.delete(k);
  }
}
