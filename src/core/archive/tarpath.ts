/**
 * Names inside a layer tar, made safe to join onto a layer directory.
 *
 * A name is split into components and judged purely lexically here; whether a
 * component on disk is a real directory (and not a symlink an earlier entry
 * planted) is apply.ts' job, which lstat()s every parent before each write.
 */
import { invalidArgument, GearError } from '../errors.js';

/** Limits on one normalised name. */
export interface PathLimits {
  /** Bytes of the normalised relative path. */
  maxPathLength: number;
  /** Number of components. */
  maxDepth: number;
}

/** Linux NAME_MAX: bytes in one path component. */
export const NAME_MAX = 255;

/** Prefixes of the OCI / AUFS whiteout convention. */
export const WHITEOUT_PREFIX = '.wh.';
export const WHITEOUT_META_PREFIX = '.wh..wh.';
export const WHITEOUT_OPAQUE = '.wh..wh..opq';

/** A printable, bounded rendering of an entry name for error messages. */
export function quoteName(name: string): string {
  const shown = name.length > 256 ? `${name.slice(0, 256)}…(${name.length} chars)` : name;
  return JSON.stringify(shown);
}

/** The InvalidArgument error every refused entry produces. */
export function refuse(name: string, reason: string, cause?: unknown): GearError {
  return invalidArgument(`layer entry ${quoteName(name)}: ${reason}`, cause);
}

/**
 * The components of a tar entry name, relative to the layer root ([] is the
 * root itself). Leading `/` and `.` components are dropped, as Docker does;
 * `..` anywhere is refused outright (a lexical clean could hide a walk
 * through a symlink, and no well-formed layer contains one), as are NUL bytes,
 * names that were not valid UTF-8 (tar-stream decodes them to U+FFFD, which
 * would silently rename the file), over-long components and the limits.
 */
export function entryComponents(name: string, limits: PathLimits, what = 'path'): string[] {
  if (name.includes('\0')) throw refuse(name, `${what} contains a NUL byte`);
  if (name.includes('\uFFFD')) throw refuse(name, `${what} is not valid UTF-8 (unsupported)`);
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') throw refuse(name, `${what} escapes the layer root`);
    if (Buffer.byteLength(part) > NAME_MAX) throw refuse(name, `${what} has a component longer than ${NAME_MAX} bytes`);
    parts.push(part);
  }
  if (parts.length > limits.maxDepth) throw refuse(name, `${what} is deeper than ${limits.maxDepth} components`);
  const length = Buffer.byteLength(parts.join('/'));
  if (length > limits.maxPathLength) throw refuse(name, `${what} is longer than ${limits.maxPathLength} bytes`);
  return parts;
}

/** What an entry means under the whiteout convention. */
export type WhiteoutKind =
  | { kind: 'none' }
  /** `.wh..wh..opq`: the containing directory is opaque. */
  | { kind: 'opaque' }
  /** `.wh.NAME`: NAME (in the same directory) is deleted. */
  | { kind: 'whiteout'; target: string }
  /** other `.wh..wh.*` (AUFS metadata such as `.wh..wh.plnk`): not layer content. */
  | { kind: 'skip' };

/**
 * Classifies normalised components. A `.wh.` prefix on a parent directory is
 * refused (the prefix is reserved; containerd's WhiteoutDirectoryName case),
 * except below AUFS metadata directories, which are skipped whole.
 */
export function classifyWhiteout(name: string, parts: string[]): WhiteoutKind {
  if (parts.length === 0) return { kind: 'none' };
  const parents = parts.slice(0, -1);
  if (parents.some((p) => p.startsWith(WHITEOUT_META_PREFIX))) return { kind: 'skip' };
  if (parents.some((p) => p.startsWith(WHITEOUT_PREFIX))) {
    throw refuse(name, `a parent directory uses the reserved "${WHITEOUT_PREFIX}" prefix`);
  }
  const base = parts[parts.length - 1]!;
  if (base === WHITEOUT_OPAQUE) return { kind: 'opaque' };
  if (base.startsWith(WHITEOUT_META_PREFIX)) return { kind: 'skip' };
  if (base.startsWith(WHITEOUT_PREFIX)) {
    const target = base.slice(WHITEOUT_PREFIX.length);
    if (target === '' || target === '.' || target === '..') throw refuse(name, 'whiteout names no valid entry');
    return { kind: 'whiteout', target };
  }
  return { kind: 'none' };
}
