/**
 * The snapshotter's metadata store: containerd's view of snapshots (keys,
 * names, kinds, labels, timestamps) over the core's layer ids.
 *
 *   ROOT/snapshotter/snapshots/<layer>.json   one record per snapshot, named by
 *                                             its layer id, written atomically
 *
 * Naming the file by the layer id (not by key or name) makes every mutation a
 * single atomic file replace: Commit rewrites the same file with the new name
 * and kind, Update rewrites labels, and no rename of data is ever needed.
 *
 * Crash safety (a kill -9 at any moment leaves a consistent store):
 * - create: the record is written with state "creating" BEFORE the layer is
 *   created, then rewritten without it. A crash in between leaves a creating
 *   record, so startup knows that layer id is ours and removes both.
 * - remove: the record is rewritten with state "removing" BEFORE the layer is
 *   removed, and deleted after. A crash in between is finished at startup
 *   (or by Cleanup).
 * So every layer this frontend ever created has a record until it is gone,
 * and layers without any record (e.g. a graph driver sharing the root) are
 * never touched.
 *
 * This module only stores records; the in-memory index and the rules (unique
 * keys, parents committed, no removal with children) live in snapshotter.ts.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { errnoCode } from '../../core/errors.js';
import { syncDir, writeFileAtomic } from '../../core/sys/fsutil.js';

export type SnapshotKind = 'view' | 'active' | 'committed';

/** Nanoseconds since the epoch, as a decimal string (JSON has no 64-bit integers). */
export type TimestampNs = string;

export interface SnapshotRecord {
  /** Layer id in the core's layer store; also the record's file name. */
  layer: string;
  /** The key (active, view) or name (committed), exactly as containerd sent it. */
  name: string;
  kind: SnapshotKind;
  /** Name of the committed parent snapshot, or ''. */
  parent: string;
  labels: Record<string, string>;
  created: TimestampNs;
  updated: TimestampNs;
  /** Disk usage recorded at Commit (committed snapshots no longer change). */
  usage?: { size: number; inodes: number };
  /** Set while the layer is being created or removed (see the header). */
  state?: 'creating' | 'removing';
}

const LAYER_ID = /^[0-9a-f]{8,64}$/;
const KINDS: readonly SnapshotKind[] = ['view', 'active', 'committed'];
const NS = /^[0-9]{1,25}$/;

/** Validates a record read from disk; throws on anything malformed. */
export function parseRecord(text: string, layer: string): SnapshotRecord {
  const r = JSON.parse(text) as Partial<SnapshotRecord>;
  if (
    r.layer !== layer ||
    typeof r.name !== 'string' ||
    r.name === '' ||
    !KINDS.includes(r.kind as SnapshotKind) ||
    typeof r.parent !== 'string' ||
    typeof r.labels !== 'object' ||
    r.labels === null ||
    !Object.values(r.labels).every((v) => typeof v === 'string') ||
    typeof r.created !== 'string' ||
    !NS.test(r.created) ||
    typeof r.updated !== 'string' ||
    !NS.test(r.updated) ||
    (r.state !== undefined && r.state !== 'creating' && r.state !== 'removing')
  ) {
    throw new Error('malformed snapshot record');
  }
  const rec: SnapshotRecord = {
    layer,
    name: r.name,
    kind: r.kind as SnapshotKind,
    parent: r.parent,
    labels: { ...r.labels },
    created: r.created,
    updated: r.updated,
  };
  if (r.usage && Number.isFinite(r.usage.size) && Number.isFinite(r.usage.inodes)) {
    rec.usage = { size: r.usage.size, inodes: r.usage.inodes };
  }
  if (r.state) rec.state = r.state;
  return rec;
}

export class MetaStore {
  readonly dir: string;

  constructor(
    root: string,
    private readonly log?: Logger,
  ) {
    this.dir = path.join(root, 'snapshots');
  }

  private file(layer: string): string {
    if (!LAYER_ID.test(layer)) throw new Error(`invalid layer id ${JSON.stringify(layer)}`);
    return path.join(this.dir, `${layer}.json`);
  }

  /**
   * Reads every record. Leftover temporary files of interrupted writes are
   * removed; a malformed record is returned in `broken` (its layer id is ours).
   */
  async load(): Promise<{ records: SnapshotRecord[]; broken: string[] }> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const records: SnapshotRecord[] = [];
    const broken: string[] = [];
    for (const name of await fs.readdir(this.dir)) {
      const full = path.join(this.dir, name);
      if (name.startsWith('.')) {
        await fs.rm(full, { force: true });
        this.log?.info({ file: name }, 'removed leftover of an interrupted metadata write');
        continue;
      }
      const layer = name.endsWith('.json') ? name.slice(0, -5) : '';
      if (!LAYER_ID.test(layer)) {
        this.log?.warn({ file: name }, 'ignoring unexpected file in the snapshot metadata directory');
        continue;
      }
      try {
        records.push(parseRecord(await fs.readFile(full, 'utf8'), layer));
      } catch (err) {
        this.log?.warn({ layer, err: (err as Error).message }, 'unreadable snapshot record');
        broken.push(layer);
      }
    }
    return { records, broken };
  }

  /** Writes (creates or replaces) a record atomically. */
  async write(rec: SnapshotRecord): Promise<void> {
    await writeFileAtomic(this.file(rec.layer), JSON.stringify(rec));
  }

  /** Deletes a record; deleting a missing one succeeds. */
  async delete(layer: string): Promise<void> {
    try {
      await fs.unlink(this.file(layer));
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
      return;
    }
    await syncDir(this.dir);
  }
}
