/**
 * Typed access to native/gear_native.cc: the Linux calls Node.js lacks
 * (extended attributes, mknod, mount(2), umount2(2), the FUSE passthrough
 * ioctls) and zstd (libzstd). All are synchronous and throw Node-style errors carrying `code`
 * ("ENOENT", "ENODATA"…).
 */
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

interface NativeModule {
  lsetxattr(path: string, name: string, value: Buffer, flags?: number): void;
  /** null when the attribute does not exist */
  lgetxattr(path: string, name: string): Buffer | null;
  llistxattr(path: string): string[];
  /** false when the attribute did not exist */
  lremovexattr(path: string, name: string): boolean;
  mknod(path: string, mode: number, major: number, minor: number): void;
  mount(source: string, target: string, fstype: string, flags: number, data: string, cwd?: string): void;
  umount2(target: string, flags: number): void;
  /**
   * mount(2) on a libuv worker thread (the JS thread stays free, e.g. to serve
   * a FUSE filesystem the mount queries). With cwd, relative paths in data
   * resolve there; only the worker thread changes directory.
   */
  mountAsync(source: string, target: string, fstype: string, flags: number, data: string, cwd?: string): Promise<void>;
  /** umount2(2) on a libuv worker thread. */
  umount2Async(target: string, flags: number): Promise<void>;
  /**
   * On a libuv worker thread: creates `staging` (O_EXCL, 0600), writes the
   * bytes, fchmods it to mode, fsyncs, closes and renames it to `final`;
   * resolves with its mtime (ms). On failure the staging file is unlinked and
   * the error carries code and syscall (open, write, fsync, rename…). With
   * `check`, data is first decoded (one zstd frame of exactly `size` bytes, or
   * `size` bytes as they are) and its SHA-256 compared, on that thread too: a
   * mismatch rejects (code ERR_GEAR_ZSTD, ERR_GEAR_SIZE or ERR_GEAR_DIGEST)
   * and creates nothing.
   */
  writeFileDurable(staging: string, final: string, data: Buffer, mode: number, check?: { sha256: string; size: number; zstd: boolean }): Promise<number>;
  /**
   * FUSE_DEV_IOC_BACKING_OPEN on a mounted /dev/fuse fd: registers fd (a
   * regular file) as a passthrough backing file and returns its backing id
   * (> 0). EPERM without negotiated passthrough or without CAP_SYS_ADMIN in
   * the initial user namespace; ELOOP when fd's filesystem is stacked at least
   * as deep as the connection's max_stack_depth; ENOTTY on kernels < 6.9.
   */
  fuseBackingOpen(devFd: number, fd: number): number;
  /** FUSE_DEV_IOC_BACKING_CLOSE: drops the registration (open files keep their own reference). */
  fuseBackingClose(devFd: number, backingId: number): void;
  /**
   * FS_IOC_MEASURE_VERITY on an open regular file: its fs-verity digest.
   * ENODATA: fs-verity is supported but not enabled on the file; EOPNOTSUPP:
   * the kernel (no CONFIG_FS_VERITY) or the filesystem (e.g. ext4 without the
   * verity feature) does not support it; ENOTTY: the filesystem lacks the ioctl.
   */
  fsverityMeasure(fd: number): { algorithm: number; digest: Buffer };
  /** One zstd frame (content size recorded, no checksum) of src; use src/core/sys/zstd.ts. */
  zstdCompress(src: Uint8Array, level: number): Buffer;
  /**
   * src must be exactly one zstd frame whose content is exactly size bytes;
   * throws (code "ERR_GEAR_ZSTD") otherwise. Use src/core/sys/zstd.ts.
   */
  zstdDecompress(src: Uint8Array, size: number): Buffer;
  zstd: { version: string; minLevel: number; maxLevel: number; maxDecompressedSize: number };
  constants: {
    MS_RDONLY: number;
    MS_NOSUID: number;
    MS_NODEV: number;
    MS_BIND: number;
    MS_REC: number;
    MS_PRIVATE: number;
    MNT_DETACH: number;
    MNT_FORCE: number;
    XATTR_CREATE: number;
    XATTR_REPLACE: number;
  };
}

function load(): NativeModule {
  const require = createRequire(import.meta.url);
  // src/core/sys or dist/core/sys → repository root is three levels up.
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
  const candidates = [
    process.env.GEAR_NATIVE_MODULE,
    path.join(root, 'build', 'Release', 'gear_native.node'),
  ].filter((p): p is string => Boolean(p));
  let lastErr: unknown;
  for (const candidate of candidates) {
    try {
      return require(candidate) as NativeModule;
    } catch (err) {
      lastErr = err;
    }
  }
  throw new Error(
    `cannot load the gear native module (tried ${candidates.join(', ')}); build it with 'npm ci' or 'npx node-gyp rebuild'`,
    { cause: lastErr },
  );
}

export const native: NativeModule = load();
export const { constants } = native;
