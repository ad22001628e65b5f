/**
 * Which active snapshots are containers. containerd's Prepare makes active
 * snapshots for two things: a container's root filesystem (key: the
 * container id, parent: the image's top chain id) and the unpacking of an
 * image layer (key "extract-<unique> <chain id>", snapshots.UnpackKeyFormat
 * in containerd 1.6 to 2.x; a remote-snapshotter-aware unpack also labels it
 * containerd.io/snapshot.ref). Only the first is a container on an image.
 *
 * A proxy snapshotter sees the keys containerd's metadata store gives it:
 * "<namespace>/<sequence>/<client key>"; the client's key is what counts.
 */
export const UNPACK_KEY_PREFIX = 'extract-';
export const SNAPSHOT_REF_LABEL = 'containerd.io/snapshot.ref';

/** The client's key and namespace of a backend key "<namespace>/<n>/<key>" (as is when not of that form). */
export function clientKey(key: string): { namespace?: string; key: string } {
  const m = /^([^/]+)\/(\d+)\/([\s\S]+)$/.exec(key);
  return m ? { namespace: m[1]!, key: m[3]! } : { key };
}

export function isImageUnpack(key: string, labels: Record<string, string> | undefined): boolean {
  return clientKey(key).key.startsWith(UNPACK_KEY_PREFIX) || (labels !== undefined && Object.hasOwn(labels, SNAPSHOT_REF_LABEL));
}
