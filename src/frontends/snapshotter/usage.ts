/** Disk usage of a directory tree, counted as containerd's fs.DiskUsage does. */
import fs from 'node:fs/promises';
import path from 'node:path';
import { errnoCode } from '../../core/errors.js';

export interface Usage {
  /** Bytes allocated (st_blocks * 512), each inode counted once. */
  size: number;
  /** Number of distinct inodes, the root included. */
  inodes: number;
}

/** Walks dir without following symlinks; entries that vanish meanwhile are skipped. */
export async function diskUsage(dir: string): Promise<Usage> {
  const seen = new Set<string>();
  let size = 0;
  const stack = [dir];
  while (stack.length > 0) {
    const cur = stack.pop()!;
    let st;
    try {
      st = await fs.lstat(cur, { bigint: true });
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') continue;
      throw err;
    }
    const ino = `${st.dev}:${st.ino}`;
    if (seen.has(ino)) continue;
    seen.add(ino);
    size += Number(st.blocks) * 512;
    if (st.isDirectory()) {
      let names: string[];
      try {
        names = await fs.readdir(cur);
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') continue;
        throw err;
      }
      for (const n of names) stack.push(path.join(cur, n));
    }
  }
  return { size, inodes: seen.size };
}
