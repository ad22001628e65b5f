/**
 * Which container a process runs in, for attributing the miss filesystem's
 * LOOKUPs (the FUSE request header carries the caller's pid): the container's
 * root is an overlay whose upperdir is the container layer's diff directory,
 * ROOT/layers/<id>/diff (both frontends lay layers out so). /proc/<pid>/ns/mnt
 * names the caller's mount namespace; its root mount is read from
 * /proc/<pid>/mountinfo once per namespace (cached, bounded).
 */
import fs from 'node:fs/promises';

const MAX_CACHED = 1024;
/** A namespace found not rooted on one of our overlays is asked again after this long (a container's init looks files up before its pivot_root). */
const NEGATIVE_MS = 5_000;
/** A namespace found to be a container's is checked again after this long: the kernel reuses namespace numbers. */
const POSITIVE_MS = 30_000;

/** The layer id in an overlay's upperdir option, if it is ROOT/layers/<id>/diff (absolute or relative to ROOT). */
export function upperLayerOf(superOptions: string, root: string): string | undefined {
  const m = /(?:^|,)upperdir=([^,]+)/.exec(superOptions);
  if (!m) return undefined;
  const upper = m[1]!;
  const rel = upper.startsWith('/') ? (upper.startsWith(`${root}/`) ? upper.slice(root.length + 1) : undefined) : upper;
  const id = rel && /^layers\/([^/]+)\/diff$/.exec(rel)?.[1];
  return id || undefined;
}

/** The container layer of the root mount in a mountinfo text, if it is one of root's. */
export function rootLayerOf(mountinfo: string, root: string): string | undefined {
  for (const line of mountinfo.split('\n')) {
    // id parent maj:min root mountpoint options [optional…] - fstype source superoptions
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const pre = line.slice(0, sep).split(' ');
    if (pre[4] !== '/') continue;
    const post = line.slice(sep + 3).split(' ');
    if (post[0] !== 'overlay') continue;
    return upperLayerOf(post.slice(2).join(' '), root);
  }
  return undefined;
}

/** A resolver pid → container layer id of the store at root (undefined: not a container of this store). */
export function callerResolver(root: string): (pid: number) => Promise<string | undefined> {
  // ns → layer, or the time a namespace was found not to be a container of ours (dockerd's own reads: /etc/passwd…).
  // Concurrent LOOKUPs from one namespace share its read of mountinfo (the promise is what is cached).
  const byNs = new Map<string, { layer: Promise<string | undefined>; at: number }>();
  return async (pid: number) => {
    const ns = await fs.readlink(`/proc/${pid}/ns/mnt`).catch(() => undefined);
    if (!ns) return undefined;
    const known = byNs.get(ns);
    if (known) {
      const layer = await known.layer;
      if (Date.now() - known.at < (layer ? POSITIVE_MS : NEGATIVE_MS)) return layer;
    }
    const layer = fs.readFile(`/proc/${pid}/mountinfo`, 'utf8').then(
      (info) => rootLayerOf(info, root),
      () => undefined,
    );
    byNs.delete(ns);
    if (byNs.size >= MAX_CACHED) byNs.delete(byNs.keys().next().value!);
    byNs.set(ns, { layer, at: Date.now() });
    return layer;
  };
}
