/**
 * Where the control endpoint of the daemon serving a Gear root listens:
 * ROOT/gear-control.sock. A unix socket path is at most 107 bytes (sun_path
 * is 108 with its NUL); the managed Docker plugin's root seen from the host
 * (<data-root>/plugins/<64 hex>/propagated-mount/store) is longer than that.
 * Both ends then reach the socket through a descriptor of ROOT:
 * /proc/self/fd/<fd>/gear-control.sock is short and resolves to the same
 * inode (bind(2) and connect(2) follow the magic link), so the socket stays
 * in the root and no second path or record of it is needed.
 */
import { closeSync, constants, openSync } from 'node:fs';
import path from 'node:path';

export const CONTROL_SOCKET = 'gear-control.sock';
/** sun_path holds 108 bytes including the terminating NUL. */
export const MAX_SOCKET_PATH = 107;

export interface SocketPath {
  /** The path to bind or connect to (short). */
  path: string;
  /** The real path, for messages. */
  real: string;
  /** Releases the directory descriptor the short path goes through (after bind/connect). */
  release(): void;
}

/** A usable path for `name` in dir: dir/name itself, or /proc/self/fd/<fd of dir>/name when that is too long. */
export function socketPathIn(dir: string, name = CONTROL_SOCKET): SocketPath {
  const real = path.join(path.resolve(dir), name);
  if (Buffer.byteLength(real) <= MAX_SOCKET_PATH) return { path: real, real, release: () => undefined };
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  let open = true;
  return {
    path: `/proc/self/fd/${fd}/${name}`,
    real,
    release: () => {
      if (open) closeSync(fd);
      open = false;
    },
  };
}
