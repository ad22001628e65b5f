/**
 * Layer records (ROOT/layers/<id>/layer.json) and the names the store hands
 * out: layer ids it accepts and the short link names under ROOT/l/.
 */
import { randomBytes } from 'node:crypto';
import { invalidArgument } from '../errors.js';
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
