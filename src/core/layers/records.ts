/**
 * Layer records (ROOT/layers/<id>/layer.json) and the names the store hands
 * out: layer ids it accepts and the short link names under ROOT/l/.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import type { Logger } from 'pino';
import { invalidArgument } from '../errors.js';
import { pathExists } from '../sys/fsutil.js';
import type { GearLayerInfo, LayerRecord } from './types.js';

/** overlay2's limit: 128 layers in one mount, so the option string stays within a page. */
export const MAX_LAYER_DEPTH = 128;

const LINK_LENGTH = 26;
const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

/** True when id can name a layer directory: 1-128 of [A-Za-z0-9_.-], no "/", never "..". */
export function isValidLayerId(id: unknown): id is string {
  return typeof id === 'string' && ID_PATTERN.test(id) && !id.includes('..');
}

/** Throws InvalidArgument unless isValidLayerId(id). */
export function validateLayerId(id: string, what = 'layer id'): void {
  if (!isValidLayerId(id)) {
    throw invalidArgument(`invalid ${what} ${JSON.stringify(id)}: expected 1-128 characters [A-Za-z0-9_.-]`);
  }
}

export function newLink(): string {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
  const bytes = randomBytes(LINK_LENGTH);
  let s = '';
  for (const b of bytes) s += alphabet[b % alphabet.length];
  return s;
}

export function parseRecord(text: string, id: string): LayerRecord {
  const r = JSON.parse(text) as Partial<LayerRecord>;
  if (
    r.id !== id ||
    typeof r.parent !== 'string' ||
    (r.kind !== 'ro' && r.kind !== 'rw') ||
    typeof r.link !== 'string' ||
    !/^[A-Z0-9]+$/.test(r.link) ||
    !Array.isArray(r.lowers) ||
    !r.lowers.every((l) => typeof l === 'string' && /^[A-Z0-9]+$/.test(l))
  ) {
    throw new Error('malformed layer record');
  }
  const rec: LayerRecord = { id, parent: r.parent, kind: r.kind, link: r.link, lowers: r.lowers, created: Number(r.created) || 0, size: r.size };
  if (r.gear !== undefined) {
    const g = r.gear as Partial<GearLayerInfo>;
    if (!g || !Array.isArray(g.blobs) || typeof g.files !== 'number') throw new Error('malformed gear info');
    if (g.packs !== undefined && !(Array.isArray(g.packs) && g.packs.every((p) => p && typeof p.digest === 'string' && Number.isSafeInteger(p.size)))) throw new Error('malformed gear packs');
    rec.gear = g as GearLayerInfo;
  }
  return rec;
}

/** What a layer's l/ link points to: index/ for an index layer, else diff/. */
export function linkTarget(r: LayerRecord): string {
  return `../layers/${r.id}/${r.gear ? 'index' : 'diff'}`;
}

/** Points r's short link at linkTarget(r), atomically (a temporary link renamed over it). */
export async function pointLink(linksDir: string, r: LayerRecord): Promise<void> {
  const tmp = path.join(linksDir, `.${r.link}.tmp`);
  await fs.rm(tmp, { force: true });
  await fs.symlink(linkTarget(r), tmp);
  await fs.rename(tmp, path.join(linksDir, r.link));
}

/** At open: drops links that point nowhere or elsewhere, recreates missing ones. */
export async function repairLinks(linksDir: string, records: ReadonlyMap<string, LayerRecord>, log: Logger | undefined): Promise<void> {
  const wanted = new Map<string, string>();
  for (const r of records.values()) wanted.set(r.link, r.id);
  for (const name of await fs.readdir(linksDir)) {
    const owner = wanted.get(name);
    const target = await fs.readlink(path.join(linksDir, name)).catch(() => '');
    if (!owner || target !== linkTarget(records.get(owner)!)) {
      await fs.rm(path.join(linksDir, name), { force: true });
      log?.info({ link: name }, 'removed stale layer link');
    }
  }
  for (const r of records.values()) {
    if (!(await pathExists(path.join(linksDir, r.link)))) {
      await fs.symlink(linkTarget(r), path.join(linksDir, r.link));
      log?.info({ layer: r.id, link: r.link }, 'recreated missing layer link');
    }
  }
}
