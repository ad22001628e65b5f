/** Extended attributes, on the file itself (never following a final symlink). */
import { native } from './native.js';

export const OVERLAY_XATTR_PREFIX = 'trusted.overlay.';

export function getXattr(path: string, name: string): Buffer | null {
  return native.lgetxattr(path, name);
}

export function setXattr(path: string, name: string, value: Buffer | string): void {
  native.lsetxattr(path, name, typeof value === 'string' ? Buffer.from(value) : value, 0);
}

export function listXattrs(path: string): string[] {
  return native.llistxattr(path);
}

export function removeXattr(path: string, name: string): boolean {
  return native.lremovexattr(path, name);
}

/** All attributes with their values, in name order. */
export function readXattrs(path: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const name of listXattrs(path).sort()) {
    const value = getXattr(path, name);
    if (value !== null) out.set(name, value);
  }
  return out;
}

/** overlayfs' own attributes: never taken from layer content, never copied into it. */
export function isOverlayPrivate(name: string): boolean {
  return name.startsWith(OVERLAY_XATTR_PREFIX);
}
