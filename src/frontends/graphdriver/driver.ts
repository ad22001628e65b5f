/**
 * The graph-driver verbs mapped onto the core's LayerStore. No HTTP here:
 * each method takes a decoded request and returns the response object (or a
 * tar stream for Diff); errors are thrown as GearErrors and turned into `Err`
 * strings by the server, in one place.
 *
 * Which store: the daemon's --root when given (then calls work even without
 * Init, e.g. after the plugin restarted under a running dockerd, which does
 * not call Init again); otherwise the Home that Init sends. dockerd sends Init
 * again when it restarts; the store is reopened only if the root changes.
 */
import path from 'node:path';
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import { failedPrecondition, invalidArgument } from '../../core/errors.js';
import type { LayerStore } from '../../core/layers/types.js';
import type { DriverRequest, DriverResponse, InitRequest } from './protocol.js';

/**
 * Opens the layer store at root (the signature of the core's openLayerStore).
 * `options` are passed through unchanged (e.g. the core's `lazy` settings).
 */
export type StoreOpener = (opts: { root: string; logger: Logger; options?: Record<string, unknown> }) => Promise<LayerStore>;

export interface GraphDriverOptions {
  /** Fixed store root (--root); when absent, Init's Home is used. */
  root?: string;
  logger: Logger;
  openStore: StoreOpener;
  /** Passed through to openStore. */
  storeOptions?: Record<string, unknown>;
}

export class GraphDriver {
  readonly #fixedRoot: string | undefined;
  readonly #logger: Logger;
  readonly #openStore: StoreOpener;
  readonly #storeOptions: Record<string, unknown> | undefined;
  /** The store being opened or open, and its root; replaced as a unit. */
  #current: { root: string; store: Promise<LayerStore> } | undefined;

  constructor(opts: GraphDriverOptions) {
    this.#fixedRoot = opts.root === undefined ? undefined : path.resolve(opts.root);
    this.#logger = opts.logger;
    this.#openStore = opts.openStore;
    this.#storeOptions = opts.storeOptions;
  }

  /** Releases the open store's resources (layer mounts stay). */
  async close(): Promise<void> {
    const cur = this.#current;
    if (!cur) return;
    const store = await cur.store.catch(() => undefined);
    await store?.close?.();
  }

  async #closeStore(opening: Promise<LayerStore>): Promise<void> {
    const store = await opening.catch(() => undefined);
    await store?.close?.().catch((err: unknown) => this.#logger.warn({ err: String(err) }, 'closing the previous store'));
  }

  /**
   * With a fixed --root: opens the store now instead of on dockerd's first
   * call, so that its start-up work (repair, the miss filesystem, the crash
   * resume of mounted containers' Gear files) runs right after a restart of
   * the daemon, which dockerd may not call for a long time. Never rejects (a
   * failed open is logged and retried on the next call).
   */
  async openEagerly(): Promise<void> {
    if (this.#fixedRoot === undefined) return;
    await this.#store().catch((err: unknown) =>
      this.#logger.error({ err: String(err) }, 'cannot open the layer store at start; the next dockerd call tries again'),
    );
  }

  /** The root of the store in use, if one was opened. */
  get root(): string | undefined {
    return this.#current?.root;
  }

  async init(req: InitRequest): Promise<DriverResponse> {
    if ((req.UIDMaps && req.UIDMaps.length > 0) || (req.GIDMaps && req.GIDMaps.length > 0)) {
      throw failedPrecondition(
        'user namespace remapping (dockerd --userns-remap) is not supported yet: Init sent non-empty UIDMaps/GIDMaps',
      );
    }
    if (req.Opts.length > 0) {
      // Like overlay2, refuse options we do not understand rather than ignore them.
      throw invalidArgument(`storage option ${JSON.stringify(req.Opts[0])}: not supported by gear`);
    }
    let root = this.#fixedRoot;
    if (root === undefined) {
      if (!req.Home) throw invalidArgument('Init: missing Home and the daemon has no --root');
      if (!path.isAbsolute(req.Home)) throw invalidArgument(`Init: Home ${JSON.stringify(req.Home)} is not absolute`);
      root = path.resolve(req.Home);
    } else if (req.Home && path.resolve(req.Home) !== root) {
      this.#logger.info({ home: req.Home, root }, 'Init: using --root instead of the Home dockerd sent');
    }
    await this.#open(root);
    return {};
  }

  async create(req: DriverRequest, kind: 'ro' | 'rw'): Promise<DriverResponse> {
    const store = await this.#store();
    const opts = Object.keys(req.StorageOpt).length > 0 ? { storageOpt: req.StorageOpt } : undefined;
    // A container's first read-write layer is its <id>-init layer on the image's top layer; its own
    // layer then sits on that one. Warn about (or refuse, --require-lazy) a non-Gear image once, here.
    const created = kind === 'rw' && !req.Parent.endsWith('-init') ? store.admitContainer?.(req.ID, req.Parent) : undefined;
    await store.create(req.ID, req.Parent, kind, opts);
    created?.();
    return {};
  }

  async remove(req: DriverRequest): Promise<DriverResponse> {
    await (await this.#store()).remove(req.ID);
    return {};
  }

  async get(req: DriverRequest): Promise<DriverResponse> {
    // MountLabel is an SELinux context; gear does not label mounts.
    return { Dir: await (await this.#store()).get(req.ID) };
  }

  async put(req: DriverRequest): Promise<DriverResponse> {
    await (await this.#store()).put(req.ID);
    return {};
  }

  async exists(req: DriverRequest): Promise<DriverResponse> {
    return { Exists: await (await this.#store()).exists(req.ID) };
  }

  async status(): Promise<DriverResponse> {
    return { Status: await (await this.#store()).status() };
  }

  async getMetadata(req: DriverRequest): Promise<DriverResponse> {
    return { Metadata: await (await this.#store()).metadata(req.ID) };
  }

  /** dockerd's shutdown: unmount everything. (A signal to the daemon does not do this.) */
  async cleanup(): Promise<DriverResponse> {
    await (await this.#store()).cleanup();
    return {};
  }

  async diff(req: DriverRequest): Promise<Readable> {
    return (await this.#store()).diff(req.ID, req.Parent);
  }

  async changes(req: DriverRequest): Promise<DriverResponse> {
    const changes = await (await this.#store()).changes(req.ID, req.Parent);
    return { Changes: changes.map((c) => ({ Path: c.path, Kind: c.kind })) };
  }

  async applyDiff(id: string, parent: string, tar: Readable): Promise<DriverResponse> {
    // Every mount of the graph driver goes through Get: the index image may come after the reply.
    return { Size: await (await this.#store()).applyDiff(id, parent, tar, { deferIndexImage: true }) };
  }

  async diffSize(req: DriverRequest): Promise<DriverResponse> {
    return { Size: await (await this.#store()).diffSize(req.ID, req.Parent) };
  }

  capabilities(): DriverResponse {
    // Not exact: dockerd keeps tar-split and rebuilds push/save tars from Get() (protocols.md A.9).
    return { Capabilities: { ReproducesExactDiffs: false } };
  }

  #store(): Promise<LayerStore> {
    if (this.#current) return this.#current.store;
    if (this.#fixedRoot !== undefined) return this.#open(this.#fixedRoot);
    return Promise.reject(failedPrecondition('GraphDriver.Init has not been called yet: no store root'));
  }

  #open(root: string): Promise<LayerStore> {
    if (this.#current?.root === root) return this.#current.store;
    const previous = this.#current;
    if (previous) this.#logger.warn({ from: previous.root, to: root }, 'store root changed; reopening');
    const store = (async () => {
      // Release the old store's resources (lazy machinery) first; its layer mounts stay.
      if (previous) await this.#closeStore(previous.store);
      this.#logger.info({ root }, 'opening layer store');
      return this.#openStore({
        root,
        logger: this.#logger.child({ component: 'layers' }),
        ...(this.#storeOptions ? { options: this.#storeOptions } : {}),
      });
    })();
    const current = { root, store };
    this.#current = current;
    // A failed open is not cached: the next Init (or call, with --root) tries again.
    store.catch(() => {
      if (this.#current === current) this.#current = undefined;
    });
    return store;
  }
}
