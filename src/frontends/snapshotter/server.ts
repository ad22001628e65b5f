/**
 * The containerd snapshotter's gRPC edge: containerd.services.snapshots.v1
 * on a unix socket, for containerd's `[proxy_plugins.<name>]`.
 *
 * Transport only: decode the request, call the Snapshotter (snapshotter.ts),
 * encode the answer, and turn a thrown error into a status code once
 * (errors.ts). One log line per call, with containerd's namespace.
 */
import { lstat, mkdir, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import type { Logger } from 'pino';
import { describeError, errnoCode, invalidArgument, unavailable } from '../../core/errors.js';
import { openLayerStore, type LayerStoreOptions } from '../../core/layers/store.js';
import { RegistryClient } from '../../core/registry/client.js';
import { streamHandler, unaryHandler } from './handlers.js';
import { RemoteSnapshots } from './remote.js';
import { Snapshotter, type MountSpec, type SnapshotInfo } from './snapshotter.js';
import type { SnapshotKind } from './metastore.js';

/** proto/ at the repository root, from src/… and from dist/… alike. */
export const PROTO_DIR = fileURLToPath(new URL('../../../proto/', import.meta.url));
const SERVICE_PROTO = 'containerd/services/snapshots/v1/snapshots.proto';
/** How many Infos go into one List message. */
const LIST_BATCH = 100;
/** How long shutdown waits for in-flight calls before cutting them off. */
const SHUTDOWN_GRACE_MS = 10_000;

// ---- wire shapes (proto-loader with keepCase, longs and enums as strings) ----

type WireKind = 'UNKNOWN' | 'VIEW' | 'ACTIVE' | 'COMMITTED';
interface WireTimestamp {
  seconds: string | number;
  nanos: number;
}
interface WireInfo {
  name: string;
  parent: string;
  kind: WireKind;
  created_at?: WireTimestamp | null;
  updated_at?: WireTimestamp | null;
  labels: Record<string, string>;
}
interface WireMount {
  type: string;
  source: string;
  target: string;
  options: string[];
}

const KIND_TO_WIRE: Record<SnapshotKind, WireKind> = { view: 'VIEW', active: 'ACTIVE', committed: 'COMMITTED' };

function timestampToWire(ns: string): WireTimestamp {
  const n = BigInt(ns);
  return { seconds: (n / 1_000_000_000n).toString(), nanos: Number(n % 1_000_000_000n) };
}

function infoToWire(i: SnapshotInfo): WireInfo {
  return {
    name: i.name,
    parent: i.parent,
    kind: KIND_TO_WIRE[i.kind],
    created_at: timestampToWire(i.created),
    updated_at: timestampToWire(i.updated),
    labels: i.labels,
  };
}

function infoFromWire(w: WireInfo | null | undefined): SnapshotInfo {
  // Only name and labels matter to Update; the rest is immutable and ignored.
  return { name: w?.name ?? '', parent: w?.parent ?? '', kind: 'active', labels: w?.labels ?? {}, created: '0', updated: '0' };
}

const mountsToWire = (ms: MountSpec[]): WireMount[] => ms.map((m) => ({ type: m.type, source: m.source, target: '', options: m.options }));

// ---- server ------------------------------------------------------------------

export interface SnapshotterServerOptions {
  /** Unix socket path to listen on. */
  socket: string;
  /** Store root: layers at ROOT/layers, snapshot metadata at ROOT/snapshotter. */
  root: string;
  logger: Logger;
  /** Store options (lazy pull); default: not lazy. */
  storeOptions?: Pick<LayerStoreOptions, 'lazy'>;
}

export interface SnapshotterServer {
  readonly socket: string;
  /** Stops accepting, lets in-flight calls finish (bounded), removes the socket. Mounts are left alone. */
  close(): Promise<void>;
}

type Handler<Req, Res> = (req: Req) => Promise<Res>;

/** Removes a stale socket file; refuses if a live server answers on it. */
async function claimSocket(socket: string): Promise<void> {
  await mkdir(path.dirname(socket), { recursive: true, mode: 0o755 });
  try {
    if (!(await lstat(socket)).isSocket()) throw unavailable(`${socket} exists and is not a socket`);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return;
    throw err;
  }
  const live = await new Promise<boolean>((resolve) => {
    const c = net.connect(socket);
    const done = (v: boolean) => {
      c.destroy();
      resolve(v);
    };
    c.once('connect', () => done(true));
    c.once('error', () => done(false));
    setTimeout(() => done(false), 2000).unref();
  });
  if (live) throw unavailable(`another process is serving ${socket}`);
  await unlink(socket);
}

/**
 * Remote snapshots (remote.ts) serve images with an attached Gear index
 * lazily; off unless GEAR_REMOTE_SNAPSHOTS=on, and only with the lazy
 * machinery (a Gear index needs it). Opt-in because a served snapshot is named
 * by chain IDs computed from the image config's diff_ids, which nobody checks
 * against content (containerd's unpack would): an image from a registry the
 * node trusts less could claim a shared base's chain ID (docs/containerd.md).
 */
function enableRemoteSnapshots(
  sn: Snapshotter,
  layers: Awaited<ReturnType<typeof openLayerStore>>,
  root: string,
  opts: SnapshotterServerOptions,
  log: Logger,
): RemoteSnapshots | undefined {
  const setting = process.env.GEAR_REMOTE_SNAPSHOTS ?? 'off';
  if (setting !== 'on' && setting !== 'off') throw invalidArgument(`GEAR_REMOTE_SNAPSHOTS=${setting.slice(0, 40)}: use on or off`);
  if (setting === 'off' || !layers.lazyRuntime) {
    log.info({ remoteSnapshots: false, reason: setting === 'off' ? 'GEAR_REMOTE_SNAPSHOTS is not on' : 'lazy pull is off' }, 'remote snapshots disabled');
    return undefined;
  }
  const lazy = typeof opts.storeOptions?.lazy === 'object' ? opts.storeOptions.lazy : {};
  const envInsecure = (process.env.GEAR_INSECURE_REGISTRIES ?? '').split(',').map((h) => h.trim()).filter(Boolean);
  const client = new RegistryClient({
    insecureRegistries: lazy.insecureRegistries ?? envInsecure,
    ...(lazy.dockerConfigPath ? { dockerConfigPath: lazy.dockerConfigPath } : {}),
  });
  const remote = new RemoteSnapshots({ snapshotter: sn, layers, client, tmpDir: path.join(root, 'snapshotter', 'remote'), logger: log.child({ component: 'remote' }) });
  remote.install();
  return remote;
}

/**
 * The Snapshots service definition from the packaged proto. Loaded before the layer store opens: a broken
 * install (proto/ missing) then fails the start before any FUSE mount exists that could hold the exit.
 */
function loadSnapshotsService(): grpc.ServiceDefinition {
  const def = protoLoader.loadSync(SERVICE_PROTO, {
    includeDirs: [PROTO_DIR],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as {
    containerd: { services: { snapshots: { v1: { Snapshots: grpc.ServiceClientConstructor } } } };
  };
  return pkg.containerd.services.snapshots.v1.Snapshots.service;
}

export async function startSnapshotterServer(opts: SnapshotterServerOptions): Promise<SnapshotterServer> {
  const log = opts.logger;
  const root = path.resolve(opts.root);
  const service = loadSnapshotsService();
  const layers = await openLayerStore({ root, logger: log.child({ component: 'layers' }), ...opts.storeOptions });
  let sn: Snapshotter;
  try {
    sn = await Snapshotter.open({ layers, metaRoot: path.join(root, 'snapshotter'), logger: log.child({ component: 'snapshots' }) });
    const snapshots = sn;
    layers.stats.containers = () => snapshots.containerLayers();
  } catch (err) {
    await layers.close?.();
    throw err;
  }
  const remote = enableRemoteSnapshots(sn, layers, root, opts, log);


  const unary = <Req, Res>(rpc: string, fn: Handler<Req, Res>) => unaryHandler(log, rpc, fn);

  const empty = {};
  const impl: grpc.UntypedServiceImplementation = {
    Prepare: unary(
      'Prepare',
      async (r: { key: string; parent: string; labels: Record<string, string> }) => ({
        mounts: mountsToWire(await sn.prepare(r.key, r.parent, r.labels)),
      }),
    ),
    View: unary(
      'View',
      async (r: { key: string; parent: string; labels: Record<string, string> }) => ({
        mounts: mountsToWire(await sn.view(r.key, r.parent, r.labels)),
      }),
    ),
    Mounts: unary('Mounts', async (r: { key: string }) => ({ mounts: mountsToWire(await sn.mounts(r.key)) })),
    Commit: unary('Commit', async (r: { name: string; key: string; labels: Record<string, string> }) => {
      await sn.commit(r.name, r.key, r.labels);
      return empty;
    }),
    Remove: unary('Remove', async (r: { key: string }) => {
      await sn.remove(r.key);
      return empty;
    }),
    Stat: unary('Stat', async (r: { key: string }) => ({ info: infoToWire(await sn.stat(r.key)) })),
    Update: unary('Update', async (r: { info?: WireInfo | null; update_mask?: { paths?: string[] } | null }) => ({
      info: infoToWire(await sn.update(infoFromWire(r.info), r.update_mask?.paths ?? [])),
    })),
    Usage: unary('Usage', async (r: { key: string }) => {
      const u = await sn.usage(r.key);
      return { size: String(u.size), inodes: String(u.inodes) };
    }),
    Cleanup: unary('Cleanup', async () => {
      await sn.cleanup();
      return empty;
    }),
    List: streamHandler(log, 'List', async (r: { filters?: string[] }) => {
      const infos = await sn.list(r.filters ?? []);
      const msgs: Array<{ info: WireInfo[] }> = [];
      for (let i = 0; i < infos.length; i += LIST_BATCH) msgs.push({ info: infos.slice(i, i + LIST_BATCH).map(infoToWire) });
      return msgs;
    }),
  };

  const server = new grpc.Server({
    'grpc.max_receive_message_length': 16 << 20,
    'grpc.max_send_message_length': 16 << 20,
  });
  server.addService(service, impl);
  try {
    await claimSocket(opts.socket);
    await new Promise<void>((resolve, reject) =>
      server.bindAsync(`unix://${path.resolve(opts.socket)}`, grpc.ServerCredentials.createInsecure(), (err) =>
        err ? reject(err) : resolve(),
      ),
    );
  } catch (err) {
    await remote?.client.close().catch(() => undefined);
    await layers.close?.();
    throw err;
  }
  log.info({ socket: opts.socket, root, lazy: !!layers.lazyRuntime }, 'containerd snapshotter listening');

  let closing: Promise<void> | undefined;
  const close = () =>
    (closing ??= (async () => {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          log.warn('in-flight calls did not finish in time; cutting them off');
          server.forceShutdown();
          resolve();
        }, SHUTDOWN_GRACE_MS);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      await sn.drain();
      await remote?.client.close().catch(() => undefined);
      const lazy = layers.lazyRuntime;
      if (lazy) log.info({ fetch: lazy.stats().fetch }, 'lazy pull totals');
      // The miss filesystem: uncached Gear files of running containers fail with EIO until the next start.
      await layers.close?.();
      await unlink(opts.socket).catch((err: unknown) => {
        if (errnoCode(err) !== 'ENOENT') log.warn({ err: describeError(err) }, 'cannot remove the socket');
      });
      log.info('containerd snapshotter stopped (mounts left to containerd)');
    })());
  return { socket: opts.socket, close };
}
