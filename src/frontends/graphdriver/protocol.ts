/**
 * The docker.graphdriver/1.0 wire protocol: request/response shapes, request
 * decoding and validation, and the one table that turns core errors into the
 * `Err` string Docker sees.
 *
 * Shapes follow moby `daemon/graphdriver/proxy.go` (v20.10–v27), not the docs,
 * where they differ (see /work/shared/reference/protocols.md A.4–A.6):
 * - requests carry no Content-Type; /Plugin.Activate sends the JSON `null`;
 * - every reply is HTTP 200, errors too, as `{"Err": "..."}` — except Diff,
 *   whose success body is a raw tar, so its errors must be non-200 (A.4);
 * - Capabilities is wrapped: `{"Capabilities": {"ReproducesExactDiffs": …}}`;
 * - ApplyDiff's `?id=&parent=` values are formatted with `%s`, not escaped;
 * - Init's UIDMaps/GIDMaps use `container_id/host_id/size` keys.
 */
import { describeError, errorClass, invalidArgument } from '../../core/errors.js';

/** Content-Type of every JSON reply (moby `plugins.VersionMimetype`). */
export const PLUGIN_MIMETYPE = 'application/vnd.docker.plugins.v1.2+json';

/** The reply to /Plugin.Activate; dockerd matches "GraphDriver" exactly. */
export const ACTIVATE_REPLY = { Implements: ['GraphDriver'] } as const;

/** moby `graphDriverRequest`. All keys are omitempty on the wire. */
export interface DriverRequest {
  ID: string;
  Parent: string;
  MountLabel: string;
  StorageOpt: Record<string, string>;
}

/** One entry of Init's UIDMaps/GIDMaps (moby `idtools.IDMap` JSON tags). */
export interface IdMap {
  container_id: number;
  host_id: number;
  size: number;
}

/** moby `graphDriverInitRequest`. */
export interface InitRequest {
  Home: string;
  Opts: string[];
  UIDMaps: IdMap[] | null;
  GIDMaps: IdMap[] | null;
}

/** moby `graphDriverResponse`; only the keys a call sets are sent. */
export interface DriverResponse {
  Err?: string;
  Dir?: string;
  Exists?: boolean;
  Status?: Array<[string, string]>;
  Changes?: Array<{ Path: string; Kind: number }>;
  Size?: number;
  Metadata?: Record<string, string>;
  Capabilities?: { ReproducesExactDiffs: boolean };
}

/**
 * Layer ids: Docker sends random 64-hex cache-ids, container ids with an
 * "-init" suffix for init layers. Anything we accept becomes a directory
 * name under the store root, so no "/" and never "..".
 */
const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

/** Throws InvalidArgument unless id is a usable layer id. `what` names the field. */
export function validateId(id: unknown, what = 'ID'): string {
  if (id === undefined || id === null || id === '') throw invalidArgument(`missing ${what}`);
  if (typeof id !== 'string') throw invalidArgument(`${what} must be a string`);
  if (!ID_RE.test(id) || id.includes('..')) {
    throw invalidArgument(`${what} ${JSON.stringify(truncate(id, 80))}: not a valid layer id`);
  }
  return id;
}

/** Like validateId, but "" (no parent) is allowed. */
export function validateParent(parent: unknown): string {
  if (parent === undefined || parent === null || parent === '') return '';
  return validateId(parent, 'Parent');
}

/**
 * Parses a JSON request body. An empty body or `null` is an empty request
 * (Activate sends `null`); anything but an object is rejected.
 */
export function parseBody(raw: Buffer): Record<string, unknown> {
  const text = raw.toString('utf8').trim();
  if (text === '') return {};
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw invalidArgument(`malformed JSON body: ${describeError(err)}`);
  }
  if (value === null) return {};
  if (typeof value !== 'object' || Array.isArray(value)) {
    throw invalidArgument(`request body must be a JSON object, got ${Array.isArray(value) ? 'array' : typeof value}`);
  }
  return value as Record<string, unknown>;
}

function optionalString(body: Record<string, unknown>, key: string): string {
  const v = body[key];
  if (v === undefined || v === null) return '';
  if (typeof v !== 'string') throw invalidArgument(`${key} must be a string`);
  return v;
}

/** Decodes and validates the fields of a per-layer request. */
export function decodeDriverRequest(body: Record<string, unknown>, opts: { parent?: boolean } = {}): DriverRequest {
  const ID = validateId(body.ID);
  const Parent = opts.parent ? validateParent(body.Parent) : '';
  const MountLabel = optionalString(body, 'MountLabel');
  const StorageOpt: Record<string, string> = {};
  const so = body.StorageOpt;
  if (so !== undefined && so !== null) {
    if (typeof so !== 'object' || Array.isArray(so)) throw invalidArgument('StorageOpt must be an object');
    for (const [k, v] of Object.entries(so)) {
      if (typeof v !== 'string') throw invalidArgument(`StorageOpt ${JSON.stringify(k)} must be a string`);
      StorageOpt[k] = v;
    }
  }
  return { ID, Parent, MountLabel, StorageOpt };
}

function decodeIdMaps(v: unknown, key: string): IdMap[] | null {
  if (v === undefined || v === null) return null;
  if (!Array.isArray(v)) throw invalidArgument(`${key} must be an array or null`);
  return v.map((m: unknown, i) => {
    const o = (m ?? {}) as Record<string, unknown>;
    const n = (k: string): number => {
      const x = o[k];
      if (typeof x !== 'number' || !Number.isInteger(x)) throw invalidArgument(`${key}[${i}].${k} must be an integer`);
      return x;
    };
    return { container_id: n('container_id'), host_id: n('host_id'), size: n('size') };
  });
}

/** Decodes Init. Home must be absolute (it is where the store lives unless --root overrides it). */
export function decodeInitRequest(body: Record<string, unknown>): InitRequest {
  const Home = optionalString(body, 'Home');
  const opts = body.Opts;
  let Opts: string[] = [];
  if (opts !== undefined && opts !== null) {
    if (!Array.isArray(opts) || opts.some((o) => typeof o !== 'string')) {
      throw invalidArgument('Opts must be an array of strings');
    }
    Opts = opts as string[];
  }
  return { Home, Opts, UIDMaps: decodeIdMaps(body.UIDMaps, 'UIDMaps'), GIDMaps: decodeIdMaps(body.GIDMaps, 'GIDMaps') };
}

/**
 * Reads `id` and `parent` from ApplyDiff's query string. dockerd builds it with
 * `fmt.Sprintf("…?id=%s&parent=%s", id, parent)`, so values arrive unescaped:
 * split on "&" and the first "=" ourselves, never turn "+" into a space, and
 * percent-decode only where that is well-formed (valid ids contain no "%").
 */
export function parseApplyDiffQuery(url: string): { id: string; parent: string } {
  const q = url.indexOf('?');
  const values = new Map<string, string>();
  if (q >= 0) {
    for (const part of url.slice(q + 1).split('&')) {
      if (part === '') continue;
      const eq = part.indexOf('=');
      const key = eq < 0 ? part : part.slice(0, eq);
      const raw = eq < 0 ? '' : part.slice(eq + 1);
      if (!values.has(key)) values.set(key, percentDecode(raw));
    }
  }
  return { id: validateId(values.get('id'), 'id'), parent: validateParent(values.get('parent')) };
}

function percentDecode(s: string): string {
  if (!s.includes('%')) return s;
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

/**
 * THE mapping from a thrown value to Docker's `Err` string: the core error
 * class as a prefix (moby turns `Err` into `errors.New`, so the class survives
 * only as text) followed by the message chain, e.g.
 * "NotFound: layer 3f2a…: no such layer". Anything that is not a GearError is
 * "Internal".
 */
export function toWireError(err: unknown): string {
  return `${errorClass(err)}: ${describeError(err)}`;
}

function truncate(s: string, n: number): string {
  return s.length <= n ? s : `${s.slice(0, n)}…`;
}
