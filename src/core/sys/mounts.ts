/**
 * Mounting and the mount table. Options are built from a typed model and only
 * turned into the kernel's string form here, at the edge.
 */
import { readFileSync } from 'node:fs';
import { constants, native } from './native.js';

export interface MountEntry {
  id: number;
  parentId: number;
  mountPoint: string;
  fsType: string;
  source: string;
  options: string;
  superOptions: string;
}

/** mount(2) copies the option string as one page: at most 4095 bytes plus NUL. */
export const MAX_MOUNT_DATA = 4095;

function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Parses /proc/self/mountinfo (proc(5)). */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    if (left.length < 6 || right.length < 3) continue;
    out.push({
      id: Number(left[0]),
      parentId: Number(left[1]),
      mountPoint: unescapeMountinfo(left[4]!),
      options: left[5]!,
      fsType: right[0]!,
      source: unescapeMountinfo(right[1]!),
      superOptions: right[2]!,
    });
  }
  return out;
}

export function readMounts(): MountEntry[] {
  return parseMountinfo(readFileSync('/proc/self/mountinfo', 'utf8'));
}

export function isMountPoint(path: string, mounts: MountEntry[] = readMounts()): boolean {
  return mounts.some((m) => m.mountPoint === path);
}

/** Mount points at or below dir, deepest first (the order to unmount them in). */
export function mountsUnder(dir: string, mounts: MountEntry[] = readMounts()): MountEntry[] {
  const prefix = dir.endsWith('/') ? dir : dir + '/';
  return mounts
    .filter((m) => m.mountPoint === dir || m.mountPoint.startsWith(prefix))
    .sort((a, b) => b.mountPoint.length - a.mountPoint.length || b.id - a.id);
}

export interface OverlayOptions {
  /** Lower layers, topmost first. Paths may be relative to `cwd`. */
  lowers: string[];
  /** Data-only lower layers (Linux 6.5+), searched in order for metacopy data. */
  dataLowers?: string[];
  upper?: string;
  work?: string;
  /** Extra options such as metacopy=on, redirect_dir=on, index=off. */
  extra?: string[];
}

/** The overlay option string, e.g. "index=off,lowerdir=a:b::c,upperdir=u,workdir=w". */
export function overlayData(o: OverlayOptions): string {
  if (o.lowers.length === 0) throw new Error('overlay needs at least one lower layer');
  for (const p of [...o.lowers, ...(o.dataLowers ?? []), o.upper ?? '', o.work ?? '']) {
    if (/[,:\\]/.test(p)) throw new Error(`overlay layer path contains a reserved character (, : \\): ${p}`);
  }
  let lower = o.lowers.join(':');
  for (const d of o.dataLowers ?? []) lower += '::' + d;
  const parts = [...(o.extra ?? []), `lowerdir=${lower}`];
  if (o.upper) {
    if (!o.work) throw new Error('overlay upperdir needs a workdir');
    parts.push(`upperdir=${o.upper}`, `workdir=${o.work}`);
  }
  return parts.join(',');
}

/**
 * Mounts an overlay at target. Relative layer paths resolve against cwd; the
 * option string must fit one page (MAX_MOUNT_DATA).
 */
export function mountOverlay(target: string, o: OverlayOptions, cwd?: string, flags = 0): void {
  const data = overlayData(o);
  if (Buffer.byteLength(data) > MAX_MOUNT_DATA) {
    throw new Error(`overlay mount options for ${target} are ${Buffer.byteLength(data)} bytes, over the ${MAX_MOUNT_DATA}-byte limit`);
  }
  native.mount('overlay', target, 'overlay', flags, data, cwd);
}

export function bindMount(source: string, target: string, readOnly = false): void {
  native.mount(source, target, 'none', constants.MS_BIND, '');
  if (readOnly) native.mount('none', target, 'none', constants.MS_BIND | constants.MS_RDONLY | 0x20 /* MS_REMOUNT */, '');
}

/** Unmounts target. Returns false when it was not mounted. */
export function unmount(target: string, opts: { lazy?: boolean } = {}): boolean {
  try {
    native.umount2(target, opts.lazy ? constants.MNT_DETACH : 0);
    return true;
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'EINVAL' || code === 'ENOENT') return false;
    if (code === 'EBUSY' && !opts.lazy) {
      native.umount2(target, constants.MNT_DETACH);
      return true;
    }
    throw err;
  }
}

/** Unmounts everything at or below dir, deepest first. Returns the mount points unmounted. */
export function unmountAllUnder(dir: string): string[] {
  const done: string[] = [];
  for (const m of mountsUnder(dir)) {
    if (unmount(m.mountPoint, { lazy: true })) done.push(m.mountPoint);
  }
  return done;
}

/** Detaches whatever is mounted at or below dir. */
export function unmountUnder(dir: string): void {
  for (const m of mountsUnder(dir)) unmount(m.mountPoint, { lazy: true });
}
