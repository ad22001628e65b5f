/**
 * Checks for a tree a hostile layer was applied to (or next to): a snapshot
 * of a sentinel tree that must not change, and the overlay xattrs that must
 * not have arrived from the tar.
 */
import fs from 'node:fs';
import path from 'node:path';
import { getXattr, listXattrs } from '../../src/core/sys/xattr.js';

/** Path, type, mode, owner, size, links, mtime, xattrs, content and link target of every entry, as one string. */
export function treeSnapshot(dir: string): string {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.lstatSync(p);
      let line = `${path.relative(dir, p)} ${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.size} ${st.nlink} ${st.mtimeMs} ${listXattrs(p).sort().join(',')}`;
      if (st.isSymbolicLink()) line += ` -> ${fs.readlinkSync(p)}`;
      else if (st.isFile()) line += ` ${fs.readFileSync(p, 'latin1')}`;
      out.push(line);
      if (st.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return out.join('\n');
}

/** Overlay xattrs under dir other than the opaque markers apply sets itself ("path name" each). */
export function foreignOverlayXattrs(dir: string): string[] {
  const bad: string[] = [];
  const visit = (p: string): void => {
    const st = fs.lstatSync(p);
    for (const x of listXattrs(p)) {
      if (x.startsWith('user.overlay.')) bad.push(`${p} ${x}`);
      if (!x.startsWith('trusted.overlay.')) continue;
      if (x === 'trusted.overlay.opaque' && st.isDirectory() && getXattr(p, x)?.toString() === 'y') continue;
      bad.push(`${p} ${x}`);
    }
    if (st.isDirectory()) for (const n of fs.readdirSync(p)) visit(path.join(p, n));
  };
  visit(dir);
  return bad;
}
