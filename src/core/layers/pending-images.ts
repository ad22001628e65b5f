/**
 * Index images written after ApplyDiff returned. A pull ends once the index
 * layer is durable (its index.tar synced, its tree checked, its record
 * written); the EROFS image is then written and mounted while Docker
 * registers the image and starts the container, which took ~200 ms before
 * its first Get in the bench. Whatever mounts a layer above an index layer
 * waits for that layer's image first (ready()).
 *
 * A crash in between leaves a record whose image file is missing:
 * rebuildMissingImage() writes it again from the layer's index.tar at the
 * next start, before anything is mounted.
 */
import fsSync from 'node:fs';
import { describeError, GearError } from '../errors.js';
import { readIndexLayer } from '../index/index-layer.js';
import type { Logger } from '../log.js';
import { indexTreeFromEntries, writeIndexImage } from './index-image.js';

export class PendingImages {
  private readonly pending = new Map<string, Promise<void>>();

  constructor(private readonly log: Logger | undefined) {}

  /** Runs the write of layer id's image (then its mount) in the background. */
  start(id: string, write: () => Promise<void>): void {
    const t0 = Date.now();
    const p = write().then(
      () => {
        this.log?.debug({ layer: id, ms: Date.now() - t0 }, 'wrote index image');
        if (this.pending.get(id) === p) this.pending.delete(id);
      },
      (err: unknown) => {
        this.log?.warn({ layer: id, err: describeError(err) }, 'could not write the index image of a pulled layer');
        // Kept (rejected): every Get above it says why until the layer is removed or the daemon restarts (which rebuilds it).
        throw new GearError('Internal', `layer ${id}: its index image could not be written (${describeError(err)}); restart the daemon to rebuild it, or remove the image and pull it again`, { cause: err });
      },
    );
    p.catch(() => undefined); // (the Gets above it see the error)
    this.pending.set(id, p);
  }

  /** Waits for the images of these layers being written; throws when one failed. */
  async ready(ids: Iterable<string>): Promise<void> {
    for (const id of ids) {
      const p = this.pending.get(id);
      if (p) await p;
    }
  }

  /** Waits for layer id's write, failed or not, and forgets it (remove). */
  async settle(id: string): Promise<void> {
    await this.pending.get(id)?.catch(() => undefined);
    this.pending.delete(id);
  }

  /** Waits for every write, failed or not (cleanup, close). */
  async settleAll(): Promise<void> {
    await Promise.all([...this.pending.values()].map((p) => p.catch(() => undefined)));
  }
}

/**
 * After a crash between a pull's ApplyDiff and the write of its image: the
 * image again from the layer's index.tar (validated as at the pull), for
 * each of these image-form layers whose image file is missing.
 */
export async function rebuildMissingImages(layers: Iterable<{ id: string; image: string; tarFile: string }>, log: Logger | undefined): Promise<void> {
  for (const { id, image, tarFile } of layers) {
    if (fsSync.existsSync(image) || !fsSync.existsSync(tarFile)) continue;
    const layer = await readIndexLayer(fsSync.createReadStream(tarFile));
    writeIndexImage(image, indexTreeFromEntries(layer.manifest, layer.entries).root);
    log?.warn({ layer: id }, 'rebuilt the index image of a layer (the previous run stopped before writing it)');
  }
}
