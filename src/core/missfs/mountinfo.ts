/** The mount table lines at one mount point (moved out of server.ts). */
import { readFileSync } from 'node:fs';

export interface MountLine {
  id: number;
  dev: string;
  mountPoint: string;
  fsType: string;
}

export function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Mounts at exactly mp, in mount-table order (the last one is on top). */
export function mountsAt(mp: string): MountLine[] {
  const out: MountLine[] = [];
  let text: string;
  try {
    text = readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return out;
  }
  for (const line of text.split('\n')) {
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const left = line.slice(0, sep).split(' ');
    const right = line.slice(sep + 3).split(' ');
    if (left.length < 6 || right.length < 1) continue;
    const mountPoint = unescapeMountinfo(left[4]!);
    if (mountPoint !== mp) continue;
    out.push({ id: Number(left[0]), dev: left[2]!, mountPoint, fsType: right[0]! });
  }
  return out;
}
