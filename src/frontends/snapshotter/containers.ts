/**
 * Which active snapshots are containers. containerd's Prepare makes active
 * snapshots for two things: a container's root filesystem (key: the
 * container id, parent: the image's top chain id) and the unpacking of an
 * image layer (key "extract-<unique> <chain id>", snapshots.UnpackKeyFormat
 * in containerd 1.6 to 2.x; a remote-snapshotter-aware unpack also labels it
 * containerd.io/snapshot.ref). Only the first is a container on an image.
 */
export const UNPACK_KEY_PREFIX = 'extract-';
export const SNAPSHOT_REF_LABEL = 'containerd.io/snapshot.ref';

export function isImageUnpack(key: string, labels: Record<string, string> | undefined): boolean {
  return key.startsWith(UNPACK_KEY_PREFIX) || (labels !== undefined && Object.hasOwn(labels, SNAPSHOT_REF_LABEL));
}
