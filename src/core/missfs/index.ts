/** The miss filesystem: FUSE over /dev/fuse, the last data-only layer of container overlays. */
export { mountMissFs, MISSFS_FSTYPE, MISSFS_MOUNT_OPTIONS } from './server.js';
export type { MissFsMount, MountMissFsOptions, UnmountOptions } from './server.js';
export type { MissFile, MissFsStats, MissProvider } from './types.js';
export { abortAllSessions, liveSessions } from './connections.js';
