/**
 * containerd's remote-snapshot protocol for images that carry an attached
 * Gear index (`gear convert --attach`, docs/format.md §9).
 *
 * containerd's unpacker calls Prepare(key, parent) for each layer of an image
 * with labels: `containerd.io/snapshot.ref` (the layer's chain ID, the name
 * the committed snapshot must get) and, when the client wraps its pull with
 * snapshotters.AppendInfoHandlerWrapper (CRI always; Docker 28's image store;
 * ctr through the transfer service when the snapshotter exports
 * `enable_remote_snapshot_annotations = "true"`), the `cri.*` labels naming
 * the image reference, the manifest digest and the layer digest. If the
 * snapshotter answers ALREADY_EXISTS after committing a snapshot with that
 * name and label on the given parent, containerd neither downloads nor
 * unpacks the layer.
 *
 * What Gear does: on the first such Prepare of an image it looks for a Gear
 * index attached to the image manifest (core/index/gear-referrer.ts), fetches
 * the index blob (verified) and builds the Gear index layer in the store, as
 * a pull of a Gear image would. Only once that worked does it answer:
 * - each layer below the top: an *empty* committed snapshot (label
 *   gear.remote=empty): it holds none of the layer's files, which the index
 *   above shows;
 * - the top layer: the Gear index layer (label gear.remote=index).
 * Mounts stop at the nearest Gear index layer, so containers see the index's
 * tree only (snapshotter.ts). An empty layer that another image would see
 * (it shares the layer, e.g. a common base) is first filled: its blob is
 * downloaded from the image it was served for (its labels name both),
 * verified and applied, as containerd would have done (fill()). If that
 * fails, the mount is refused with an error naming the remedy; an empty
 * layer is never shown as if it were the layer.
 *
 * Anything that fails (no referrer, a registry error, a check) answers
 * "prepare normally": containerd then downloads and unpacks the layer as it
 * would without Gear. Results per image are cached for a while, so a plain
 * image costs one referrers lookup per pull, not one per layer.
 */
import { randomBytes } from 'node:crypto';
import { createReadStream, rmSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { describeError } from '../../core/errors.js';
import { fetchGearIndexBlob, findGearReferrer, type GearReferrer } from '../../core/index/gear-referrer.js';
import type { LayerStore } from '../../core/layers/types.js';
import type { RegistryClient } from '../../core/registry/client.js';
import { isDigest } from '../../core/registry/digest.js';
import { parseReference } from '../../core/registry/reference.js';
import { GEAR_OWN_LABEL_PREFIX, GEAR_REMOTE_LABEL, type Snapshotter } from './snapshotter.js';
import { diskUsage } from './usage.js';

export const SNAPSHOT_REF_LABEL = 'containerd.io/snapshot.ref';
export const IMAGE_REF_LABEL = 'containerd.io/snapshot/cri.image-ref';
export const MANIFEST_DIGEST_LABEL = 'containerd.io/snapshot/cri.manifest-digest';
export const LAYER_DIGEST_LABEL = 'containerd.io/snapshot/cri.layer-digest';
/**
 * Where an empty layer's real content is, as the verified plan said it (not the client's cri.* labels): the
 * source repository, the layer blob's digest and its size. Gear's own labels (GEAR_OWN_LABEL_PREFIX).
 */
const SOURCE_REPO_LABEL = 'containerd.io/snapshot/gear.source-repo';
const SOURCE_DIGEST_LABEL = 'containerd.io/snapshot/gear.source-digest';
const SOURCE_SIZE_LABEL = 'containerd.io/snapshot/gear.source-size';

/** How long a "no Gear index for this image" answer is reused. */
const NEGATIVE_TTL_MS = 60_000;
/** Images remembered at most. */
const MAX_PLANS = 256;
/** A referrer lookup plus index download may take this long before the layer is prepared normally. */
const PLAN_TIMEOUT_MS = 120_000;
/** A built Gear index that no top-layer Prepare adopted within this time (an abandoned pull) is removed. */
const UNADOPTED_TTL_MS = 30 * 60_000;

type RemoteLayers = Pick<LayerStore, 'create' | 'remove' | 'applyDiff'>;

interface Plan {
  referrer: GearReferrer;
  /** The built Gear index layer, reserved until the top layer's Prepare adopts it. */
  indexLayer: string;
  reservation: string;
  /** Set once the top layer took the index layer, or once it expired (then nobody may take it). */
  taken?: 'adopted' | 'expired';
}

interface CacheEntry {
  plan: Promise<Plan | undefined>;
  at: number;
}

export interface RemoteSnapshotsOptions {
  snapshotter: Snapshotter;
  layers: RemoteLayers;
  client: RegistryClient;
  /** Scratch directory for index downloads (ROOT/snapshotter/remote). */
  tmpDir: string;
  logger?: Logger;
}

export class RemoteSnapshots {
  private readonly sn: Snapshotter;
  private readonly layers: RemoteLayers;
  readonly client: RegistryClient;
  private readonly tmpDir: string;
  private readonly log: Logger | undefined;
  private readonly plans = new Map<string, CacheEntry>();
  /** Counters for tests and logs. */
  readonly stats = { served: 0, empty: 0, index: 0, declined: 0, failed: 0, filled: 0 };

  constructor(opts: RemoteSnapshotsOptions) {
    this.sn = opts.snapshotter;
    this.layers = opts.layers;
    this.client = opts.client;
    this.tmpDir = opts.tmpDir;
    this.log = opts.logger;
  }

  /** Plugs into the snapshotter's Prepare. */
  install(): void {
    // Downloads a killed run left behind (index blobs, fill tars): never needed again.
    // Synchronous, once at start, so that no Prepare's download can race it.
    try {
      rmSync(this.tmpDir, { recursive: true, force: true });
    } catch (err) {
      this.log?.warn({ err: describeError(err) }, 'remote: could not clear the scratch dir');
    }
    this.sn.setRemotePrepare(
      (key, parent, labels) => this.prepare(key, parent, labels),
      (records) => this.fill(records),
    );
  }

  /** Fills in progress, by snapshot name. */
  private readonly filling = new Map<string, Promise<void>>();

  /**
   * Gives empty layers (bottom first) their real content: another image
   * shares them and sees them without the Gear index above. Each is
   * downloaded from the layer the verified plan named when it was served
   * (Gear's own source labels, not the client's cri.* labels), bounded by its
   * size, verified against its digest, and applied as containerd would have.
   */
  async fill(records: ReadonlyArray<{ name: string; layer: string; labels: Record<string, string> }>): Promise<void> {
    for (const r of records) {
      let p = this.filling.get(r.name);
      if (!p) {
        p = this.fillOne(r).finally(() => this.filling.delete(r.name));
        this.filling.set(r.name, p);
      }
      await p;
    }
  }

  private async fillOne(r: { name: string; layer: string; labels: Record<string, string> }): Promise<void> {
    if (this.sn.recordOf(r.name)?.labels[GEAR_REMOTE_LABEL] !== 'empty') return;
    const digest = r.labels[SOURCE_DIGEST_LABEL];
    const repoName = r.labels[SOURCE_REPO_LABEL];
    const size = Number(r.labels[SOURCE_SIZE_LABEL]);
    if (!digest || !isDigest(digest) || !repoName || !Number.isSafeInteger(size) || size < 0) {
      throw new Error(`snapshot ${r.name}: no verified source layer (digest, repository, size) to fetch its content from`);
    }
    const ref = parseReference(repoName);
    await fs.mkdir(this.tmpDir, { recursive: true, mode: 0o700 });
    const blob = path.join(this.tmpDir, `fill-${randomBytes(6).toString('hex')}.tar`);
    try {
      await this.client.fetchBlobVerified({ registry: ref.registry, repository: ref.repository }, digest, blob, { signal: AbortSignal.timeout(PLAN_TIMEOUT_MS * 5), expectedSize: size });
      await this.layers.applyDiff(r.layer, '', createReadStream(blob));
      await this.sn.markFilled(r.name, await diskUsage(await this.sn.diffDirOf(r.layer)));
      this.stats.filled++;
      this.log?.info({ snapshot: r.name, layer: digest, repository: repoName }, 'remote snapshot: filled a Gear-served empty layer with its content (another image uses it)');
    } finally {
      await fs.rm(blob, { force: true }).catch(() => undefined);
    }
  }

  /** True when the committed snapshot `labels[snapshot.ref]` exists on `parent` now (answer ALREADY_EXISTS). */
  async prepare(key: string, parent: string, labels: Record<string, string>): Promise<boolean> {
    const target = labels[SNAPSHOT_REF_LABEL];
    const imageRef = labels[IMAGE_REF_LABEL];
    const manifest = labels[MANIFEST_DIGEST_LABEL];
    if (!target || !imageRef || !manifest) return false;
    if (!isDigest(target) || !isDigest(manifest)) return false;
    const fields = { key, target, image: imageRef };
    try {
      const have = this.sn.recordOf(target);
      if (have) return have.kind === 'committed' && have.parent === parent && have.labels[SNAPSHOT_REF_LABEL] === target && !!have.labels[GEAR_REMOTE_LABEL];
      let repo: string;
      try {
        const ref = parseReference(imageRef);
        repo = `${ref.registry}/${ref.repository}`;
      } catch {
        return false;
      }
      const plan = await this.planFor(repo, manifest);
      if (!plan) {
        this.stats.declined++;
        return false;
      }
      const chain = plan.referrer.sourceChainIds;
      const i = chain.indexOf(target);
      if (i < 0) return false;
      // The parent must be this image's layer below (by its chain ID label), or none for the first.
      if (i === 0 ? parent !== '' : this.sn.recordOf(parent)?.labels[SNAPSHOT_REF_LABEL] !== chain[i - 1]) return false;
      const keep = Object.fromEntries(
        Object.entries(labels).filter(([k]) => k === SNAPSHOT_REF_LABEL || (k.startsWith('containerd.io/snapshot/') && !k.startsWith(GEAR_OWN_LABEL_PREFIX))),
      );
      if (i === chain.length - 1) {
        await this.adoptIndex(manifest, repo, plan, target, parent, keep);
        this.stats.index++;
        this.log?.info({ ...fields, gear: plan.referrer.gearManifest, layers: chain.length }, 'remote snapshot: top layer served by the attached Gear index');
      } else {
        const src = plan.referrer.sourceLayers[i];
        if (!src) return false;
        await this.emptyLayer(target, parent, {
          ...keep,
          [SOURCE_REPO_LABEL]: repo,
          [SOURCE_DIGEST_LABEL]: src.digest,
          [SOURCE_SIZE_LABEL]: String(src.size),
        });
        this.stats.empty++;
        this.log?.debug({ ...fields, layer: i + 1, of: chain.length }, 'remote snapshot: layer below the Gear index');
      }
      this.stats.served++;
      return true;
    } catch (err) {
      this.stats.failed++;
      this.log?.warn({ ...fields, err: describeError(err) }, 'remote snapshot failed; containerd downloads the layer instead');
      return false;
    }
  }

  /** The plan of an image (cached): its Gear referrer, with the index layer built. */
  private planFor(repo: string, manifest: string): Promise<Plan | undefined> {
    const id = `${repo}@${manifest}`;
    const cached = this.plans.get(id);
    // A plan in progress or built is reused (its `at` is far ahead); a negative one until it expires.
    if (cached && Date.now() - cached.at < NEGATIVE_TTL_MS) return cached.plan;
    const plan = this.buildPlan(repo, manifest).catch((err: unknown) => {
      this.log?.warn({ image: id, err: describeError(err) }, 'remote snapshot: cannot use a Gear index for this image');
      return undefined;
    });
    if (this.plans.size >= MAX_PLANS) {
      const oldest = this.plans.keys().next().value;
      if (oldest !== undefined) this.plans.delete(oldest);
    }
    this.plans.set(id, { plan, at: Number.MAX_SAFE_INTEGER });
    void plan.then((p) => {
      // A built plan stays until its index is adopted (or for UNADOPTED_TTL_MS); a negative one expires.
      if (!p && this.plans.get(id)?.plan === plan) this.plans.set(id, { plan, at: Date.now() });
      if (p) setTimeout(() => void this.expire(id, plan, p), UNADOPTED_TTL_MS).unref();
    });
    return plan;
  }

  /** Drops a built index that no pull adopted (its pull was abandoned). */
  private async expire(id: string, entry: Promise<Plan | undefined>, plan: Plan): Promise<void> {
    if (plan.taken) return;
    plan.taken = 'expired';
    if (this.plans.get(id)?.plan === entry) this.plans.delete(id);
    await this.layers.remove(plan.indexLayer).catch(() => undefined);
    await this.sn.releaseLayer(plan.reservation).catch(() => undefined);
    this.log?.info({ image: id, layer: plan.indexLayer }, 'remote snapshot: removed a Gear index no pull took');
  }

  private async buildPlan(repo: string, manifest: string): Promise<Plan | undefined> {
    const signal = AbortSignal.timeout(PLAN_TIMEOUT_MS);
    const referrer = await findGearReferrer(this.client, repo, manifest, {
      signal,
      onReject: (d, why) => this.log?.warn({ image: `${repo}@${manifest}`, referrer: d, why }, 'remote snapshot: ignoring a Gear referrer'),
    });
    if (!referrer) return undefined;
    const layer = randomBytes(8).toString('hex');
    const reservation = `gear-remote-pending/${layer}`;
    await this.sn.reserveLayer(layer, reservation);
    await fs.mkdir(this.tmpDir, { recursive: true, mode: 0o700 });
    const blob = path.join(this.tmpDir, `${layer}.tar.gz`);
    let created = false;
    try {
      await fetchGearIndexBlob(this.client, referrer, blob, signal);
      await this.layers.create(layer, '', 'ro');
      created = true;
      // The layer store recognises the index layer tar and builds the Gear index (as a graph-driver pull does).
      await this.layers.applyDiff(layer, '', createReadStream(blob));
      if (!this.sn.layerIsGearIndex(layer)) throw new Error(`index layer ${referrer.index.digest} of ${referrer.gearManifest} is not a Gear index layer`);
      this.log?.info({ image: `${repo}@${manifest}`, gear: referrer.gearManifest, index: referrer.index.digest, layer }, 'remote snapshot: Gear index fetched and built');
      return { referrer, indexLayer: layer, reservation };
    } catch (err) {
      if (created) await this.layers.remove(layer).catch(() => undefined);
      await this.sn.releaseLayer(reservation).catch(() => undefined);
      throw err;
    } finally {
      await fs.rm(blob, { force: true }).catch(() => undefined);
    }
  }

  private async adoptIndex(manifest: string, repo: string, plan: Plan, name: string, parent: string, labels: Record<string, string>): Promise<void> {
    if (plan.taken) throw new Error(`the Gear index built for this image was ${plan.taken}`);
    plan.taken = 'adopted';
    // Taken once, whatever happens: the next pull of this image (after its snapshots are gone) builds a new index layer.
    this.plans.delete(`${repo}@${manifest}`);
    try {
      const usage = await diskUsage(await this.sn.diffDirOf(plan.indexLayer));
      await this.sn.adoptCommitted({ name, parent, labels: { ...labels, [GEAR_REMOTE_LABEL]: 'index' }, layer: plan.indexLayer, usage, reserved: plan.reservation });
    } catch (err) {
      await this.layers.remove(plan.indexLayer).catch(() => undefined);
      await this.sn.releaseLayer(plan.reservation).catch(() => undefined);
      throw err;
    }
  }

  private async emptyLayer(name: string, parent: string, labels: Record<string, string>): Promise<void> {
    const layer = randomBytes(8).toString('hex');
    await this.sn.reserveLayer(layer, `gear-remote-pending/${layer}`);
    try {
      await this.layers.create(layer, '', 'ro');
      await this.sn.adoptCommitted({ name, parent, labels: { ...labels, [GEAR_REMOTE_LABEL]: 'empty' }, layer, usage: { size: 0, inodes: 1 }, reserved: `gear-remote-pending/${layer}` });
    } catch (err) {
      await this.layers.remove(layer).catch(() => undefined);
      await this.sn.releaseLayer(`gear-remote-pending/${layer}`).catch(() => undefined);
      throw err;
    }
  }
}
