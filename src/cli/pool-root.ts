/**
 * Finding the Gear root (the directory holding `pool/`) from what a user
 * passes as `--root`. The managed Docker plugin keeps its store at
 * `/var/lib/gear/store` inside the plugin, which is
 * `<docker data-root>/plugins/<plugin id>/propagated-mount/store` on the
 * host; docs/plugin.md names the propagated-mount directory, so a user
 * naturally points `--root` at it, at the plugin directory, at its rootfs or
 * at `<data-root>/plugins`. Those are followed to the store.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { notFound } from '../core/errors.js';

/** True when dir holds a Gear pool (`pool/sha256/`). */
export function holdsPool(dir: string): boolean {
  try {
    return statSync(path.join(dir, 'pool', 'sha256')).isDirectory();
  } catch {
    return false;
  }
}

const PLUGIN_STORE = path.join('propagated-mount', 'store');

/** Gear roots of managed plugins under `<data-root>/plugins`. */
function pluginStores(pluginsDir: string): string[] {
  let ids: string[];
  try {
    ids = readdirSync(pluginsDir).filter((n) => /^[0-9a-f]{64}$/.test(n));
  } catch {
    return [];
  }
  return ids.map((id) => path.join(pluginsDir, id, PLUGIN_STORE)).filter(holdsPool);
}

/**
 * The Gear root for `root`: root itself when it holds a pool, else the one
 * managed plugin store found from it (`followed`). Otherwise a NotFound
 * error that says where the managed plugin keeps its pool.
 */
export function resolveGearRoot(root: string): { root: string; followed: boolean } {
  if (holdsPool(root)) return { root, followed: false };
  const abs = path.resolve(root);
  const candidates = [
    path.join(abs, 'store'), // …/propagated-mount
    path.join(abs, PLUGIN_STORE), // …/plugins/<id>
    path.join(path.dirname(abs), PLUGIN_STORE), // …/plugins/<id>/rootfs
  ].filter(holdsPool);
  const stores = [...new Set([...candidates, ...pluginStores(abs), ...pluginStores(path.join(abs, 'plugins'))])];
  if (stores.length === 1) return { root: stores[0]!, followed: true };
  if (stores.length > 1) {
    throw notFound(`no Gear pool in ${root}, but several managed plugins' pools under it: ${stores.join(', ')}; pass one of them as --root`);
  }
  throw notFound(
    `no Gear pool in ${root} (no ${path.join(root, 'pool')}${existsSync(root) ? '' : '; the directory does not exist'}). ` +
      `The managed Docker plugin keeps its pool under <docker data-root>/plugins/<plugin id>/propagated-mount/store ` +
      `(id: docker plugin inspect -f '{{.Id}}' gear); pass that as --root`,
  );
}
