// gear_native: the few Linux system calls Node.js does not expose.
//
// Every function is synchronous and fails by throwing an Error shaped like
// Node's own fs errors ({code: "ENOENT", errno, syscall, path}), so callers can
// test err.code exactly as they would for fs.* errors; except mountAsync and
// umount2Async, which run on a libuv worker thread and return a Promise
// rejected with such an Error. zstdCompress and zstdDecompress (libzstd) throw
// Errors with code "ERR_GEAR_ZSTD" for input that is not what they accept.
#include <napi.h>
#include <zstd.h>
#include <zstd_errors.h>
#include <openssl/evp.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <memory>
#include <new>
#include <string>
#include <vector>

static_assert(ZSTD_VERSION_NUMBER >= 10400, "libzstd >= 1.4 (Debian 11+: libzstd-dev)");

namespace {

const char* ErrnoName(int e) {
  switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EACCES: return "EACCES";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EXDEV: return "EXDEV";
    case ENODEV: return "ENODEV";
    case ENOTDIR: return "ENOTDIR";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENOSPC: return "ENOSPC";
    case EROFS: return "EROFS";
    case ERANGE: return "ERANGE";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case ENOTEMPTY: return "ENOTEMPTY";
    case ELOOP: return "ELOOP";
    case ENODATA: return "ENODATA";
    case ENOTSUP: return "ENOTSUP";
    case E2BIG: return "E2BIG";
    case EDQUOT: return "EDQUOT";
    case ENOTCONN: return "ENOTCONN";
    case ENOMEM: return "ENOMEM";
    default: return "EUNKNOWN";
  }
}

Napi::Error ErrnoError(Napi::Env env, int e, const char* syscall, const std::string& path) {
  std::string msg = std::string(ErrnoName(e)) + ": " + strerror(e) + ", " + syscall + " '" + path + "'";
  Napi::Error err = Napi::Error::New(env, msg);
  err.Set("code", Napi::String::New(env, ErrnoName(e)));
  err.Set("errno", Napi::Number::New(env, -e));
  err.Set("syscall", Napi::String::New(env, syscall));
  err.Set("path", Napi::String::New(env, path));
  return err;
}

Napi::Value ThrowErrno(Napi::Env env, int e, const char* syscall, const std::string& path) {
  ErrnoError(env, e, syscall, path).ThrowAsJavaScriptException();
  return env.Undefined();
}

bool ArgString(const Napi::CallbackInfo& info, size_t i, std::string* out) {
  if (info.Length() <= i || !info[i].IsString()) {
    Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + " must be a string")
        .ThrowAsJavaScriptException();
    return false;
  }
  *out = info[i].As<Napi::String>().Utf8Value();
  if (out->find('\0') != std::string::npos) {
    Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + " contains a NUL byte")
        .ThrowAsJavaScriptException();
    return false;
  }
  return true;
}

bool ArgNumber(const Napi::CallbackInfo& info, size_t i, double* out) {
  if (info.Length() <= i || !info[i].IsNumber()) {
    Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + " must be a number")
        .ThrowAsJavaScriptException();
    return false;
  }
  *out = info[i].As<Napi::Number>().DoubleValue();
  return true;
}

// lsetxattr(path, name, value: Buffer, flags = 0)
Napi::Value LSetXattr(const Napi::CallbackInfo& info) {
  std::string path, name;
  if (!ArgString(info, 0, &path) || !ArgString(info, 1, &name)) return info.Env().Undefined();
  if (info.Length() < 3 || !info[2].IsBuffer()) {
    Napi::TypeError::New(info.Env(), "value must be a Buffer").ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  auto buf = info[2].As<Napi::Buffer<uint8_t>>();
  int flags = 0;
  if (info.Length() > 3 && info[3].IsNumber()) flags = info[3].As<Napi::Number>().Int32Value();
  if (lsetxattr(path.c_str(), name.c_str(), buf.Data(), buf.Length(), flags) != 0)
    return ThrowErrno(info.Env(), errno, "lsetxattr", path);
  return info.Env().Undefined();
}

// lgetxattr(path, name): Buffer, or null when the attribute is absent (ENODATA).
Napi::Value LGetXattr(const Napi::CallbackInfo& info) {
  std::string path, name;
  if (!ArgString(info, 0, &path) || !ArgString(info, 1, &name)) return info.Env().Undefined();
  for (int attempt = 0; attempt < 4; attempt++) {
    ssize_t n = lgetxattr(path.c_str(), name.c_str(), nullptr, 0);
    if (n < 0) {
      if (errno == ENODATA) return info.Env().Null();
      return ThrowErrno(info.Env(), errno, "lgetxattr", path);
    }
    std::vector<uint8_t> data(n > 0 ? n : 1);
    ssize_t m = lgetxattr(path.c_str(), name.c_str(), data.data(), n);
    if (m < 0) {
      if (errno == ERANGE) continue;  // grew between the two calls
      if (errno == ENODATA) return info.Env().Null();
      return ThrowErrno(info.Env(), errno, "lgetxattr", path);
    }
    return Napi::Buffer<uint8_t>::Copy(info.Env(), data.data(), m);
  }
  return ThrowErrno(info.Env(), ERANGE, "lgetxattr", path);
}

// llistxattr(path): string[]
Napi::Value LListXattr(const Napi::CallbackInfo& info) {
  std::string path;
  if (!ArgString(info, 0, &path)) return info.Env().Undefined();
  for (int attempt = 0; attempt < 4; attempt++) {
    ssize_t n = llistxattr(path.c_str(), nullptr, 0);
    if (n < 0) return ThrowErrno(info.Env(), errno, "llistxattr", path);
    std::vector<char> data(n > 0 ? n : 1);
    ssize_t m = n > 0 ? llistxattr(path.c_str(), data.data(), n) : 0;
    if (m < 0) {
      if (errno == ERANGE) continue;
      return ThrowErrno(info.Env(), errno, "llistxattr", path);
    }
    Napi::Array out = Napi::Array::New(info.Env());
    uint32_t idx = 0;
    size_t start = 0;
    for (ssize_t i = 0; i < m; i++) {
      if (data[i] == '\0') {
        if ((size_t)i > start) out.Set(idx++, Napi::String::New(info.Env(), data.data() + start, i - start));
        start = i + 1;
      }
    }
    return out;
  }
  return ThrowErrno(info.Env(), ERANGE, "llistxattr", path);
}

// lremovexattr(path, name): true if removed, false if it was absent.
Napi::Value LRemoveXattr(const Napi::CallbackInfo& info) {
  std::string path, name;
  if (!ArgString(info, 0, &path) || !ArgString(info, 1, &name)) return info.Env().Undefined();
  if (lremovexattr(path.c_str(), name.c_str()) != 0) {
    if (errno == ENODATA) return Napi::Boolean::New(info.Env(), false);
    return ThrowErrno(info.Env(), errno, "lremovexattr", path);
  }
  return Napi::Boolean::New(info.Env(), true);
}

// mknod(path, mode, major, minor): mode includes the file type (S_IFCHR, S_IFBLK, S_IFIFO).
Napi::Value Mknod(const Napi::CallbackInfo& info) {
  std::string path;
  double mode, major, minor;
  if (!ArgString(info, 0, &path) || !ArgNumber(info, 1, &mode) || !ArgNumber(info, 2, &major) ||
      !ArgNumber(info, 3, &minor))
    return info.Env().Undefined();
  if (major < 0 || minor < 0 || major > 0xfff || minor > 0xfffff) return ThrowErrno(info.Env(), EINVAL, "mknod", path);
  if (mknod(path.c_str(), (mode_t)mode, makedev((unsigned)major, (unsigned)minor)) != 0)
    return ThrowErrno(info.Env(), errno, "mknod", path);
  return info.Env().Undefined();
}

// The arguments of mount and mountAsync: (source, target, fstype, flags, data, cwd?).
struct MountArgs {
  std::string source, target, fstype, data, cwd;
  double flags = 0;
  bool haveCwd = false;
};

// Fills *a; false (with a JS exception pending) on a bad argument.
bool ParseMountArgs(const Napi::CallbackInfo& info, MountArgs* a) {
  if (!ArgString(info, 0, &a->source) || !ArgString(info, 1, &a->target) || !ArgString(info, 2, &a->fstype) ||
      !ArgNumber(info, 3, &a->flags) || !ArgString(info, 4, &a->data))
    return false;
  a->haveCwd = info.Length() > 5 && info[5].IsString();
  return !a->haveCwd || ArgString(info, 5, &a->cwd);
}

// mount(source, target, fstype, flags, data, cwd?): when cwd is given, the
// process changes into it for the call so that relative paths in data (overlay
// lowerdir=l/ABC:l/DEF) resolve there, then changes back. Synchronous, on the
// JS thread: the project passes only absolute paths to fs calls, so a
// momentary cwd change cannot affect other work.
Napi::Value Mount(const Napi::CallbackInfo& info) {
  MountArgs a;
  if (!ParseMountArgs(info, &a)) return info.Env().Undefined();
  const std::string &source = a.source, &target = a.target, &fstype = a.fstype, &data = a.data, &cwd = a.cwd;
  const double flags = a.flags;
  const bool haveCwd = a.haveCwd;
  int saved = -1;
  if (haveCwd) {
    saved = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (saved < 0) return ThrowErrno(info.Env(), errno, "open", ".");
    if (chdir(cwd.c_str()) != 0) {
      int e = errno;
      close(saved);
      return ThrowErrno(info.Env(), e, "chdir", cwd);
    }
  }
  int rc = mount(source.c_str(), target.c_str(), fstype.c_str(), (unsigned long)flags,
                 data.empty() ? nullptr : data.c_str());
  int e = errno;
  if (haveCwd) {
    if (fchdir(saved) != 0) { /* nothing sensible to do; the cwd is not used */ }
    close(saved);
  }
  if (rc != 0) return ThrowErrno(info.Env(), e, "mount", target);
  return info.Env().Undefined();
}

// mountAsync(source, target, fstype, flags, data, cwd?) and
// umount2Async(target, flags): the same calls on a libuv worker thread,
// returning a Promise. For mounts whose filesystem this process serves (an
// overlay over the miss filesystem queries it while mounting): the JS thread
// stays free to answer. With a cwd, the worker thread first unshares its
// filesystem attributes (unshare(CLONE_FS)), so its chdir never moves the
// cwd of the process's other threads, and changes back afterwards.
class MountWorker : public Napi::AsyncWorker {
 public:
  MountWorker(Napi::Env env, bool isMount, std::string source, std::string target, std::string fstype,
              unsigned long flags, std::string data, bool haveCwd, std::string cwd)
      : Napi::AsyncWorker(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        isMount_(isMount),
        source_(std::move(source)),
        target_(std::move(target)),
        fstype_(std::move(fstype)),
        flags_(flags),
        data_(std::move(data)),
        haveCwd_(haveCwd),
        cwd_(std::move(cwd)) {}

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    int saved = -1;
    if (haveCwd_) {
      if (unshare(CLONE_FS) != 0) return Fail(errno, "unshare", cwd_);
      saved = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (saved < 0) return Fail(errno, "open", ".");
      if (chdir(cwd_.c_str()) != 0) {
        int e = errno;
        close(saved);
        return Fail(e, "chdir", cwd_);
      }
    }
    int rc = isMount_ ? mount(source_.c_str(), target_.c_str(), fstype_.c_str(), flags_, data_.empty() ? nullptr : data_.c_str())
                      : umount2(target_.c_str(), (int)flags_);
    int e = errno;
    if (haveCwd_) {
      if (fchdir(saved) != 0) { /* this thread's own cwd; nothing else uses it */ }
      close(saved);
    }
    if (rc != 0) Fail(e, isMount_ ? "mount" : "umount2", target_);
  }

  void OnOK() override {
    if (errno_ != 0) deferred_.Reject(ErrnoError(Env(), errno_, syscall_, path_).Value());
    else deferred_.Resolve(Env().Undefined());
  }

  void OnError(const Napi::Error& err) override { deferred_.Reject(err.Value()); }

 private:
  void Fail(int e, const char* syscall, const std::string& path) {
    errno_ = e;
    syscall_ = syscall;
    path_ = path;
  }

  Napi::Promise::Deferred deferred_;
  bool isMount_;
  std::string source_, target_, fstype_;
  unsigned long flags_;
  std::string data_;
  bool haveCwd_;
  std::string cwd_;
  int errno_ = 0;
  const char* syscall_ = "";
  std::string path_;
};

// Queues w (libuv deletes it when done) and returns its Promise.
Napi::Value QueueMountWorker(MountWorker* w) {
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value MountAsync(const Napi::CallbackInfo& info) {
  MountArgs a;
  if (!ParseMountArgs(info, &a)) return info.Env().Undefined();
  return QueueMountWorker(new MountWorker(info.Env(), true, a.source, a.target, a.fstype, (unsigned long)a.flags, a.data, a.haveCwd, a.cwd));
}

Napi::Value Umount2Async(const Napi::CallbackInfo& info) {
  std::string target;
  double flags;
  if (!ArgString(info, 0, &target) || !ArgNumber(info, 1, &flags)) return info.Env().Undefined();
  return QueueMountWorker(new MountWorker(info.Env(), false, "", target, "", (unsigned long)flags, "", false, ""));
}

// umount2(target, flags)
Napi::Value Umount2(const Napi::CallbackInfo& info) {
  std::string target;
  double flags;
  if (!ArgString(info, 0, &target) || !ArgNumber(info, 1, &flags)) return info.Env().Undefined();
  if (umount2(target.c_str(), (int)flags) != 0) return ThrowErrno(info.Env(), errno, "umount2", target);
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------
// FUSE passthrough (Linux >= 6.9, protocol 7.40): register a backing file with
// a FUSE connection, and drop the registration. Defined here because the
// system's <linux/fuse.h> may predate them; layout and numbers as in
// include/uapi/linux/fuse.h (struct fuse_backing_map, FUSE_DEV_IOC_MAGIC 229).
struct GearFuseBackingMap {
  int32_t fd;
  uint32_t flags;
  uint64_t padding;
};
static_assert(sizeof(GearFuseBackingMap) == 16, "struct fuse_backing_map is 16 bytes");
#define GEAR_FUSE_DEV_IOC_BACKING_OPEN _IOW(229, 1, GearFuseBackingMap)
#define GEAR_FUSE_DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)
static_assert(GEAR_FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501, "FUSE_DEV_IOC_BACKING_OPEN");
static_assert(GEAR_FUSE_DEV_IOC_BACKING_CLOSE == 0x4004E502, "FUSE_DEV_IOC_BACKING_CLOSE");

// ErrnoName() does not know ioctl-specific codes: an old kernel answers ENOTTY.
Napi::Value ThrowIoctlErrno(Napi::Env env, int e, const char* what) {
  const char* name = e == ENOTTY ? "ENOTTY" : e == EOPNOTSUPP ? "EOPNOTSUPP" : ErrnoName(e);
  std::string msg = std::string(name) + ": " + strerror(e) + ", " + what;
  Napi::Error err = Napi::Error::New(env, msg);
  err.Set("code", Napi::String::New(env, name));
  err.Set("errno", Napi::Number::New(env, -e));
  err.Set("syscall", Napi::String::New(env, what));
  err.ThrowAsJavaScriptException();
  return env.Undefined();
}

bool ArgFd(const Napi::CallbackInfo& info, size_t i, int* out) {
  double v;
  if (!ArgNumber(info, i, &v)) return false;
  if (!(v >= 0 && v <= 0x7fffffff) || v != (double)(int)v) {
    Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + " must be a non-negative integer")
        .ThrowAsJavaScriptException();
    return false;
  }
  *out = (int)v;
  return true;
}

// fuseBackingOpen(devFd, fd): the backing id (> 0) for FOPEN_PASSTHROUGH replies.
Napi::Value FuseBackingOpen(const Napi::CallbackInfo& info) {
  int dev, fd;
  if (!ArgFd(info, 0, &dev) || !ArgFd(info, 1, &fd)) return info.Env().Undefined();
  GearFuseBackingMap map;
  memset(&map, 0, sizeof(map));
  map.fd = fd;
  int id = ioctl(dev, GEAR_FUSE_DEV_IOC_BACKING_OPEN, &map);
  if (id < 0) return ThrowIoctlErrno(info.Env(), errno, "ioctl(FUSE_DEV_IOC_BACKING_OPEN)");
  return Napi::Number::New(info.Env(), id);
}

// fuseBackingClose(devFd, backingId)
Napi::Value FuseBackingClose(const Napi::CallbackInfo& info) {
  int dev, id;
  if (!ArgFd(info, 0, &dev) || !ArgFd(info, 1, &id)) return info.Env().Undefined();
  uint32_t arg = (uint32_t)id;
  if (ioctl(dev, GEAR_FUSE_DEV_IOC_BACKING_CLOSE, &arg) != 0)
    return ThrowIoctlErrno(info.Env(), errno, "ioctl(FUSE_DEV_IOC_BACKING_CLOSE)");
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------
// fs-verity: FS_IOC_MEASURE_VERITY on an open file. Used to probe support
// without changing anything: a file without verity answers ENODATA where the
// kernel and the filesystem support fs-verity, EOPNOTSUPP where either does
// not (kernel without CONFIG_FS_VERITY, ext4 without the verity feature), and
// ENOTTY on filesystems that do not know the ioctl. Layout as in
// include/uapi/linux/fsverity.h (struct fsverity_digest).
struct GearFsverityDigest {
  uint16_t digest_algorithm;
  uint16_t digest_size;  // in: room in digest[]; out: the digest's size
  uint8_t digest[64];
};
struct GearFsverityDigestHeader {
  uint16_t digest_algorithm;
  uint16_t digest_size;
};
#define GEAR_FS_IOC_MEASURE_VERITY _IOWR('f', 134, GearFsverityDigestHeader)
static_assert(GEAR_FS_IOC_MEASURE_VERITY == 0xc0046686, "FS_IOC_MEASURE_VERITY");

// fsverityMeasure(fd): { algorithm, digest: Buffer }
Napi::Value FsverityMeasure(const Napi::CallbackInfo& info) {
  int fd;
  if (!ArgFd(info, 0, &fd)) return info.Env().Undefined();
  GearFsverityDigest d;
  memset(&d, 0, sizeof(d));
  d.digest_size = sizeof(d.digest);
  if (ioctl(fd, GEAR_FS_IOC_MEASURE_VERITY, &d) != 0)
    return ThrowIoctlErrno(info.Env(), errno, "ioctl(FS_IOC_MEASURE_VERITY)");
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("algorithm", Napi::Number::New(info.Env(), d.digest_algorithm));
  size_t n = d.digest_size <= sizeof(d.digest) ? d.digest_size : sizeof(d.digest);
  out.Set("digest", Napi::Buffer<uint8_t>::Copy(info.Env(), d.digest, n));
  return out;
}

Napi::Object InitFusePassthrough(Napi::Env env, Napi::Object exports) {
  exports.Set("fuseBackingOpen", Napi::Function::New(env, FuseBackingOpen));
  exports.Set("fuseBackingClose", Napi::Function::New(env, FuseBackingClose));
  exports.Set("fsverityMeasure", Napi::Function::New(env, FsverityMeasure));
  return exports;
}

// ---------------------------------------------------------------------------
// zstd (format v3 pack members, docs/format.md §10). Synchronous: a caller
// with bulk work runs it on a worker thread. The contexts are per thread
// (each worker thread has its own), reused across calls: creating a level-3
// compression context costs more than compressing a small file.

// The largest decompressed size zstdDecompress accepts (a member is at most
// 64 MiB; the limit keeps a caller's mistake from allocating gigabytes).
constexpr size_t kZstdMaxDecompressedSize = size_t(256) << 20;

struct CCtxFree { void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); } };
struct DCtxFree { void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); } };
thread_local std::unique_ptr<ZSTD_CCtx, CCtxFree> tlsCCtx;
thread_local std::unique_ptr<ZSTD_DCtx, DCtxFree> tlsDCtx;

Napi::Value ThrowZstd(Napi::Env env, const std::string& msg) {
  Napi::Error err = Napi::Error::New(env, msg);
  err.Set("code", Napi::String::New(env, "ERR_GEAR_ZSTD"));
  err.ThrowAsJavaScriptException();
  return env.Undefined();
}

// A Buffer or any other Uint8Array / TypedArray view: its bytes.
bool ArgBytes(const Napi::CallbackInfo& info, size_t i, const uint8_t** data, size_t* len) {
  if (info.Length() > i && info[i].IsTypedArray()) {
    Napi::TypedArray ta = info[i].As<Napi::TypedArray>();
    if (ta.TypedArrayType() == napi_uint8_array) {
      Napi::Uint8Array a = ta.As<Napi::Uint8Array>();
      *data = a.Data();
      *len = a.ByteLength();
      return true;
    }
  }
  Napi::TypeError::New(info.Env(), "argument " + std::to_string(i) + " must be a Uint8Array")
      .ThrowAsJavaScriptException();
  return false;
}

// A whole number in [min, max].
bool ArgInteger(const Napi::CallbackInfo& info, size_t i, double min, double max, double* out) {
  if (info.Length() > i && info[i].IsNumber()) {
    double v = info[i].As<Napi::Number>().DoubleValue();
    if (v == (double)(int64_t)v && v >= min && v <= max) {
      *out = v;
      return true;
    }
  }
  Napi::RangeError::New(info.Env(), "argument " + std::to_string(i) + " must be a whole number from " +
                                        std::to_string((int64_t)min) + " to " + std::to_string((int64_t)max))
      .ThrowAsJavaScriptException();
  return false;
}

// zstdCompress(src: Uint8Array, level: number): Buffer — one zstd frame that
// records its content size (no checksum: every member has a sha256).
Napi::Value ZstdCompress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const uint8_t* src;
  size_t n;
  double level;
  if (!ArgBytes(info, 0, &src, &n) || !ArgInteger(info, 1, ZSTD_minCLevel(), ZSTD_maxCLevel(), &level))
    return env.Undefined();
  size_t bound = ZSTD_compressBound(n);
  if (ZSTD_isError(bound)) return ThrowZstd(env, "zstd: input of " + std::to_string(n) + " bytes is too large");
  if (!tlsCCtx) tlsCCtx.reset(ZSTD_createCCtx());
  if (!tlsCCtx) return ThrowZstd(env, "zstd: cannot allocate a compression context");
  std::unique_ptr<uint8_t[]> dst(new (std::nothrow) uint8_t[bound ? bound : 1]);
  if (!dst) return ThrowZstd(env, "zstd: cannot allocate " + std::to_string(bound) + " bytes");
  size_t r = ZSTD_compressCCtx(tlsCCtx.get(), dst.get(), bound, src, n, (int)level);
  if (ZSTD_isError(r)) return ThrowZstd(env, std::string("zstd: compression failed: ") + ZSTD_getErrorName(r));
  return Napi::Buffer<uint8_t>::Copy(env, dst.get(), r);
}

// zstdDecompress(src: Uint8Array, size: number): Buffer of exactly size bytes.
// src must be exactly one zstd frame (no skippable or legacy frame, nothing
// before or after it) whose content is exactly size bytes; never allocates
// more than size bytes for the output.
// One zstd frame of exactly `size` bytes from src into dst (size bytes): "" or
// why not. Safe on any thread (a decompression context per thread).
std::string ZstdDecodeTo(const uint8_t* src, size_t n, size_t size, uint8_t* dst) {
  if (n < 4) return "zstd: not a zstd frame (" + std::to_string(n) + " bytes)";
  uint32_t magic = (uint32_t)src[0] | (uint32_t)src[1] << 8 | (uint32_t)src[2] << 16 | (uint32_t)src[3] << 24;
  if ((magic & ZSTD_MAGIC_SKIPPABLE_MASK) == ZSTD_MAGIC_SKIPPABLE_START) return "zstd: a skippable frame is not a member";
  if (magic != ZSTD_MAGICNUMBER) return "zstd: not a zstd frame (bad magic number)";
  size_t frame = ZSTD_findFrameCompressedSize(src, n);
  if (ZSTD_isError(frame)) return std::string("zstd: not one whole zstd frame: ") + ZSTD_getErrorName(frame);
  if (frame != n)
    return "zstd: " + std::to_string(n - frame) + " bytes follow the frame (" + std::to_string(frame) +
           " bytes); a member is exactly one frame";
  unsigned long long content = ZSTD_getFrameContentSize(src, n);
  if (content == ZSTD_CONTENTSIZE_ERROR) return "zstd: invalid frame header";
  if (content != ZSTD_CONTENTSIZE_UNKNOWN && content != (unsigned long long)size)
    return "zstd: the frame holds " + std::to_string(content) + " bytes, expected " + std::to_string(size);
  if (!tlsDCtx) tlsDCtx.reset(ZSTD_createDCtx());
  if (!tlsDCtx) return "zstd: cannot allocate a decompression context";
  size_t r = ZSTD_decompressDCtx(tlsDCtx.get(), dst, size, src, n);
  if (ZSTD_isError(r)) {
    if (ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall)
      return "zstd: the frame holds more than the expected " + std::to_string(size) + " bytes";
    return std::string("zstd: corrupt frame: ") + ZSTD_getErrorName(r);
  }
  if (r != size) return "zstd: the frame holds " + std::to_string(r) + " bytes, expected " + std::to_string(size);
  return "";
}

Napi::Value ZstdDecompress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const uint8_t* src;
  size_t n;
  double sizeArg;
  if (!ArgBytes(info, 0, &src, &n) || !ArgInteger(info, 1, 0, (double)kZstdMaxDecompressedSize, &sizeArg))
    return env.Undefined();
  size_t size = (size_t)sizeArg;
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(env, size);
  if (env.IsExceptionPending()) return env.Undefined();
  std::string why = ZstdDecodeTo(src, n, size, out.Data());
  if (!why.empty()) return ThrowZstd(env, why);
  return out;
}

Napi::Object InitZstd(Napi::Env env, Napi::Object exports) {
  exports.Set("zstdCompress", Napi::Function::New(env, ZstdCompress));
  exports.Set("zstdDecompress", Napi::Function::New(env, ZstdDecompress));
  Napi::Object z = Napi::Object::New(env);
  z.Set("version", Napi::String::New(env, ZSTD_versionString()));
  z.Set("minLevel", Napi::Number::New(env, ZSTD_minCLevel()));
  z.Set("maxLevel", Napi::Number::New(env, ZSTD_maxCLevel()));
  z.Set("maxDecompressedSize", Napi::Number::New(env, (double)kZstdMaxDecompressedSize));
  exports.Set("zstd", z);
  return exports;
}

// writeFileDurable(staging, final, data, mode, check?): on a libuv worker
// thread, creates staging (O_EXCL, 0600), writes the bytes, fchmods it to
// mode, fsyncs, reads its mtime, closes it and renames it to final; on any
// failure the staging file is unlinked. Resolves with the mtime in ms. One
// threadpool task instead of the seven a JS commit takes (open, write, chmod,
// fsync, close, rename, stat), each a round trip through the event loop: the
// pool's commit of many small fetched files (pool.ts addBuffer).
//
// check = {sha256, size, zstd}: data is first decoded (zstd: exactly one
// frame of exactly size bytes; else data must be size bytes) and its SHA-256
// compared with the hex digest, on the worker thread too, so the main thread
// never touches the content. A mismatch rejects with code ERR_GEAR_ZSTD,
// ERR_GEAR_SIZE or ERR_GEAR_DIGEST and creates nothing.
class DurableWriteWorker : public Napi::AsyncWorker {
 public:
  DurableWriteWorker(Napi::Env env, std::string staging, std::string final_, Napi::Buffer<uint8_t> data, mode_t mode)
      : Napi::AsyncWorker(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        staging_(std::move(staging)),
        final_(std::move(final_)),
        data_(data.Data()),
        len_(data.Length()),
        mode_(mode) {
    ref_ = Napi::Persistent(data);  // keeps the bytes alive (and unmoved) until the worker is done
  }

  void Check(std::string sha256Hex, size_t size, bool zstd) {
    hex_ = std::move(sha256Hex);
    size_ = size;
    zstd_ = zstd;
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    const uint8_t* bytes = data_;
    size_t len = len_;
    std::unique_ptr<uint8_t[]> decoded;
    if (!hex_.empty()) {
      if (zstd_) {
        decoded.reset(new (std::nothrow) uint8_t[size_ > 0 ? size_ : 1]);
        if (!decoded) return Fail(ENOMEM, "malloc", staging_, false);
        std::string why = ZstdDecodeTo(data_, len_, size_, decoded.get());
        if (!why.empty()) return Reject("ERR_GEAR_ZSTD", why);
        bytes = decoded.get();
        len = size_;
      } else if (len_ != size_) {
        return Reject("ERR_GEAR_SIZE", std::to_string(len_) + " bytes, expected " + std::to_string(size_));
      }
      unsigned char md[EVP_MAX_MD_SIZE];
      unsigned int mdLen = 0;
      if (EVP_Digest(bytes, len, md, &mdLen, EVP_sha256(), nullptr) != 1 || mdLen != 32)
        return Reject("ERR_GEAR_DIGEST", "sha256 could not be computed");
      static const char* kHex = "0123456789abcdef";
      std::string got(64, '0');
      for (unsigned i = 0; i < 32; i++) {
        got[2 * i] = kHex[md[i] >> 4];
        got[2 * i + 1] = kHex[md[i] & 15];
      }
      if (got != hex_) return Reject("ERR_GEAR_DIGEST", "got sha256:" + got);
    }
    int fd = open(staging_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return Fail(errno, "open", staging_, false);
    size_t off = 0;
    while (off < len) {
      ssize_t n = write(fd, bytes + off, len - off);
      if (n < 0) {
        if (errno == EINTR) continue;
        return FailClose(fd, errno, "write");
      }
      if (n == 0) return FailClose(fd, EIO, "write");
      off += (size_t)n;
    }
    if (fchmod(fd, mode_) != 0) return FailClose(fd, errno, "fchmod");
    if (fsync(fd) != 0) return FailClose(fd, errno, "fsync");
    struct stat st;
    if (fstat(fd, &st) != 0) return FailClose(fd, errno, "fstat");
    mtimeMs_ = (double)st.st_mtim.tv_sec * 1000.0 + (double)st.st_mtim.tv_nsec / 1e6;
    if (close(fd) != 0) return Fail(errno, "close", staging_, true);
    if (rename(staging_.c_str(), final_.c_str()) != 0) return Fail(errno, "rename", final_, true);
  }

  void OnOK() override {
    ref_.Reset();
    if (!rejectCode_.empty()) {
      Napi::Error err = Napi::Error::New(Env(), rejectMessage_);
      err.Set("code", Napi::String::New(Env(), rejectCode_));
      deferred_.Reject(err.Value());
    } else if (errno_ != 0) {
      deferred_.Reject(ErrnoError(Env(), errno_, syscall_, path_).Value());
    } else {
      deferred_.Resolve(Napi::Number::New(Env(), mtimeMs_));
    }
  }

  void OnError(const Napi::Error& err) override {
    ref_.Reset();
    deferred_.Reject(err.Value());
  }

 private:
  void Reject(const char* code, std::string message) {
    rejectCode_ = code;
    rejectMessage_ = std::move(message);
  }
  void FailClose(int fd, int e, const char* syscall) {
    close(fd);
    Fail(e, syscall, staging_, true);
  }
  void Fail(int e, const char* syscall, const std::string& path, bool created) {
    errno_ = e;
    syscall_ = syscall;
    path_ = path;
    if (created) unlink(staging_.c_str());
  }

  Napi::Promise::Deferred deferred_;
  std::string staging_, final_;
  Napi::Reference<Napi::Buffer<uint8_t>> ref_;
  const uint8_t* data_;
  size_t len_;
  mode_t mode_;
  std::string hex_;
  size_t size_ = 0;
  bool zstd_ = false;
  double mtimeMs_ = 0;
  int errno_ = 0;
  const char* syscall_ = "";
  std::string path_;
  std::string rejectCode_, rejectMessage_;
};

Napi::Value WriteFileDurable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string staging, final_;
  double mode;
  if (!ArgString(info, 0, &staging) || !ArgString(info, 1, &final_)) return env.Undefined();
  if (info.Length() < 3 || !info[2].IsBuffer()) {
    Napi::TypeError::New(env, "argument 2 must be a Buffer").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  if (!ArgInteger(info, 3, 0, 07777, &mode)) return env.Undefined();
  auto* w = new DurableWriteWorker(env, staging, final_, info[2].As<Napi::Buffer<uint8_t>>(), (mode_t)mode);
  if (info.Length() > 4 && !info[4].IsUndefined()) {
    bool ok = info[4].IsObject();
    Napi::Object c = ok ? info[4].As<Napi::Object>() : Napi::Object::New(env);
    Napi::Value hex = c.Get("sha256"), size = c.Get("size"), zstd = c.Get("zstd");
    double sz = size.IsNumber() ? size.As<Napi::Number>().DoubleValue() : -1;
    ok = ok && hex.IsString() && hex.As<Napi::String>().Utf8Value().size() == 64 && sz >= 0 &&
         sz <= (double)kZstdMaxDecompressedSize && sz == (double)(int64_t)sz;
    if (!ok) {
      delete w;
      Napi::TypeError::New(env, "argument 4 must be {sha256: 64 hex digits, size: 0.." +
                                    std::to_string(kZstdMaxDecompressedSize) + ", zstd: boolean}")
          .ThrowAsJavaScriptException();
      return env.Undefined();
    }
    w->Check(hex.As<Napi::String>().Utf8Value(), (size_t)sz, zstd.ToBoolean().Value());
  }
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("lsetxattr", Napi::Function::New(env, LSetXattr));
  exports.Set("lgetxattr", Napi::Function::New(env, LGetXattr));
  exports.Set("llistxattr", Napi::Function::New(env, LListXattr));
  exports.Set("lremovexattr", Napi::Function::New(env, LRemoveXattr));
  exports.Set("mknod", Napi::Function::New(env, Mknod));
  exports.Set("mount", Napi::Function::New(env, Mount));
  exports.Set("umount2", Napi::Function::New(env, Umount2));
  exports.Set("mountAsync", Napi::Function::New(env, MountAsync));
  exports.Set("umount2Async", Napi::Function::New(env, Umount2Async));
  exports.Set("writeFileDurable", Napi::Function::New(env, WriteFileDurable));
  Napi::Object c = Napi::Object::New(env);
  c.Set("MS_RDONLY", Napi::Number::New(env, MS_RDONLY));
  c.Set("MS_NOSUID", Napi::Number::New(env, MS_NOSUID));
  c.Set("MS_NODEV", Napi::Number::New(env, MS_NODEV));
  c.Set("MS_BIND", Napi::Number::New(env, MS_BIND));
  c.Set("MS_REC", Napi::Number::New(env, MS_REC));
  c.Set("MS_PRIVATE", Napi::Number::New(env, MS_PRIVATE));
  c.Set("MNT_DETACH", Napi::Number::New(env, MNT_DETACH));
  c.Set("MNT_FORCE", Napi::Number::New(env, MNT_FORCE));
  c.Set("XATTR_CREATE", Napi::Number::New(env, XATTR_CREATE));
  c.Set("XATTR_REPLACE", Napi::Number::New(env, XATTR_REPLACE));
  exports.Set("constants", c);
  InitFusePassthrough(env, exports);
  InitZstd(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(gear_native, Init)
