/**
 * TEMPORARY: the format v3 codec names of src/core/index/manifest.ts (being written on main, "format v3: codec"),
 * as the brief gives them, until that commit is merged. Replaced by imports from manifest.ts at the merge.
 */
import type { IndexFile as V2File, IndexManifest as V2Manifest } from '../core/index/manifest.js';

export interface PackRef { digest: string; size: number }
export type MemberEncoding = 'zstd' | 'raw';
export interface PackMember { pack: number; offset: number; length: number; encoding: MemberEncoding }
export interface FileChunk extends PackMember { digest: string }
export interface IndexFile extends V2File { member?: PackMember; chunkSize?: number; chunks?: FileChunk[] }
export interface IndexManifest extends Omit<V2Manifest, 'files'> { files: IndexFile[]; packs?: PackRef[] }
export const PACK_MEDIA_TYPE = 'application/vnd.gear.pack.v1';
export function chunkBytes(file: IndexFile, i: number): number {
  const c = file.chunkSize!;
  return Math.min(c, file.size - i * c);
}
