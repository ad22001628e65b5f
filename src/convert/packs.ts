/**
 * Format version 3 packs (docs/format.md §10.3): each planned pack (the
 * members MemberStage staged, cut by early-packs.ts in the order the layers
 * bring them) is written into the staging directory and uploaded; members
 * reused from other images keep their old ranges (their packs are brought
 * into the destination by reuse.ts). placePacks then names, per file of the
 * index, its pack range or its chunks.
 *
 * Crash safety: a pack is written to a temp name, its table of members
 * (`pack-<key>.json`, key = sha256 of the member list) renamed into place,
 * then the pack itself (`pack-<key>`): a pack file exists only complete and
 * with its table. A rerun after kill -9 (same source, same staging
 * directory) adopts them: their members count as stored (the workers do not
 * compress them again) and, the layout being deterministic, the same packs
 * are planned and uploaded from the staged files.
 */
import { createHash } from 'node:crypto';
import { open, readdir, readFile, rename, rm, stat, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import type { Destination } from './destination.js';
import type { StagedContent, StagedMember } from './member-stage.js';
import { layoutOrder, type PlannedPack } from './pack-plan.js';
import type { FileChunk, IndexManifest, PackMember, PackRef } from '../core/index/manifest.js';

const HEX_RE = /^[a-f0-9]{64}$/;

/** A complete pack left in the staging directory (by this run or a killed one). */
export interface StagedPack {
  key: string;
  file: string;
  digest: string;
  size: number;
  members: { hex: string; size: number; length: number; encoding: 'zstd' | 'raw'; offset: number }[];
}

/** The plan key of a pack: sha256 over its members (digest, byte count, stored length, encoding) in order. */
export function packKey(members: readonly { hex: string; size: number; length: number; encoding: string }[]): string {
  const h = createHash('sha256');
  for (const m of members) h.update(`${m.hex} ${m.size} ${m.length} ${m.encoding}\n`);
  return h.digest('hex');
}

/**
 * The complete packs a killed run left in `dir` (kept), after removing what
 * cannot be used again: spool files, temp files, tables without their pack,
 * packs whose table does not match them.
 */
export async function adoptStagedPacks(dir: string): Promise<Map<string, StagedPack>> {
  const out = new Map<string, StagedPack>();
  const names = await readdir(dir);
  const present = new Set(names);
  for (const name of names) {
    const m = /^pack-([a-f0-9]{64})(\.json)?$/.exec(name);
    if (!m) {
      if (name.startsWith('spool-') || name.includes('.tmp-')) await rm(join(dir, name), { force: true });
      continue;
    }
    if (!m[2]) {
      if (!present.has(`${name}.json`)) await rm(join(dir, name), { force: true });
      continue;
    }
    const file = join(dir, `pack-${m[1]}`);
    if (!present.has(`pack-${m[1]}`)) {
      await rm(join(dir, name), { force: true });
      continue;
    }
    try {
      const t = JSON.parse(await readFile(join(dir, name), 'utf8')) as StagedPack;
      const st = await stat(file);
      const ok =
        HEX_RE.test(t.digest?.slice(7) ?? '') &&
        t.size === st.size &&
        Array.isArray(t.members) &&
        t.members.every((x) => HEX_RE.test(x.hex) && Number.isSafeInteger(x.offset) && Number.isSafeInteger(x.length) && x.length > 0 && x.offset + x.length <= t.size && (x.encoding === 'zstd' || x.encoding === 'raw')) &&
        packKey(t.members) === m[1];
      if (!ok) throw new Error('table does not match');
      out.set(m[1], { key: m[1], file, digest: t.digest, size: t.size, members: t.members });
    } catch {
      await rm(file, { force: true });
      await rm(join(dir, name), { force: true });
    }
  }
  return out;
}

/** The members of staged packs as known members (local source), by hex. */
export function stagedPackMembers(packs: Iterable<StagedPack>): Map<string, StagedMember> {
  const out = new Map<string, StagedMember>();
  for (const p of packs) {
    for (const m of p.members) {
      if (!out.has(m.hex)) out.set(m.hex, { hex: m.hex, size: m.size, length: m.length, encoding: m.encoding, src: { kind: 'local', file: p.file, offset: m.offset } });
    }
  }
  return out;
}

export interface PackStats {
  packs: number;
  packBytes: number;
  /** Packs the destination did not have, and their bytes. */
  packsUploaded: number;
  packBytesUploaded: number;
  /** Packs taken from the staging directory of a killed run. */
  packsResumed: number;
}

export interface WritePacksOptions {
  dir: string;
  dst: Destination;
  concurrency: number;
  staged: Map<string, StagedPack>;
  maxPackBytes?: number;
  progress?: (e: { kind: 'pack'; digest: string; size: number; status: 'exists' | 'uploaded' }) => void;
}

/** Reads the member bytes a planned pack needs into one buffer. */
async function assemble(plan: PlannedPack<StagedMember>, handles: Map<string, Promise<FileHandle>>): Promise<Buffer> {
  const buf = Buffer.allocUnsafeSlow(plan.size);
  for (const { member, offset } of plan.members) {
    if (member.src.kind !== 'local') throw new Error('internal: a reused member in a new pack');
    const file = member.src.file;
    let h = handles.get(file);
    if (!h) {
      h = open(file, 'r');
      handles.set(file, h);
    }
    const { bytesRead } = await (await h).read(buf, offset, member.length, member.src.offset);
    if (bytesRead !== member.length) throw new Error(`staging file ${file} is shorter than its table says`);
  }
  return buf;
}

/** Numbers the temporary names of staged packs within this process. */
let tmpSeq = 0;

/**
 * Writes (stages) and uploads one planned pack; returns its descriptor. A pack
 * the staging directory already holds complete is uploaded from there (its
 * digest checked again). `handles` caches the staging files read (the caller
 * closes them).
 */
export async function writePack(p: PlannedPack<StagedMember>, opts: WritePacksOptions, handles: Map<string, Promise<FileHandle>>, stats: PackStats): Promise<PackRef> {
  const table = p.members.map(({ member: m, offset }) => ({ hex: m.hex, size: m.size, length: m.length, encoding: m.encoding, offset }));
  const key = packKey(table);
  const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;
  let buf: Buffer;
  let digest: string;
  let staging: Promise<void> | undefined;
  const staged = opts.staged.get(key);
  if (staged) {
    buf = await readFile(staged.file);
    digest = sha(buf);
    if (digest !== staged.digest || buf.length !== p.size) throw new Error(`staged pack ${staged.file} changed on disk; remove ${opts.dir} and convert again`);
    stats.packsResumed++;
  } else {
    buf = await assemble(p, handles);
    digest = sha(buf);
    const d = digest;
    const b = buf;
    // Staged (for a rerun after a kill) while it uploads: the upload does not wait for the disk.
    staging = (async () => {
      const tmp = join(opts.dir, `pack-${key}.tmp-${process.pid}-${tmpSeq++}`);
      await writeFile(tmp, b, { mode: 0o600 });
      const tableTmp = `${tmp}.json`;
      await writeFile(tableTmp, JSON.stringify({ key, digest: d, size: b.length, members: table }), { mode: 0o600 });
      await rename(tableTmp, join(opts.dir, `pack-${key}.json`));
      await rename(tmp, join(opts.dir, `pack-${key}`));
      // Later members of this run may name bytes in it (none do today); the spool stays the source.
      opts.staged.set(key, { key, file: join(opts.dir, `pack-${key}`), digest: d, size: b.length, members: table });
    })();
  }
  // Both settle before an error goes on: nothing of this pack is still writing when the caller cleans up.
  const [pushed, stagedOk] = await Promise.allSettled([opts.dst.pushBytes(digest, buf), staging]);
  if (pushed.status === 'rejected') throw pushed.reason;
  if (stagedOk.status === 'rejected') throw stagedOk.reason;
  const status = pushed.value;
  stats.packs++;
  stats.packBytes += buf.length;
  if (status === 'uploaded') {
    stats.packsUploaded++;
    stats.packBytesUploaded += buf.length;
  }
  opts.progress?.({ kind: 'pack', digest, size: buf.length, status });
  return { digest, size: buf.length };
}

/** No pack written yet. */
export const noPackStats = (): PackStats => ({ packs: 0, packBytes: 0, packsUploaded: 0, packBytesUploaded: 0, packsResumed: 0 });

/** Where the reused (old) packs go in the new index: assigned by the caller, by (image, pack) of the source. */
export type OldPackIndex = (image: number, pack: number) => number;

/** The new packs of a conversion, as EarlyPacker wrote them: the plan and, per pack, its descriptor. */
export interface WrittenPacks {
  plan: PlannedPack<StagedMember>[];
  refs: PackRef[];
  stats: PackStats;
}

/**
 * Fills every file of `manifest` with its member or chunks and
 * `manifest.packs`: the new packs `written` (in the order they were written;
 * a pack no file of the tree uses is left out, see `unlisted`), then the
 * reused ones. `oldPacks.index` assigns indexes (after the new packs) to the
 * reused packs it is asked about, in layout order of first use (the prefetch
 * list, then path order: deterministic); `oldPacks.list()` then lists them.
 */
export function placePacks(
  manifest: IndexManifest,
  contents: ReadonlyMap<string, StagedContent>,
  written: WrittenPacks,
  oldPacks: { index: (image: number, pack: number) => number; list: () => PackRef[] },
): { unlisted: { packs: number; bytes: number } } {
  const where = new Map<StagedMember, { pack: number; offset: number }>();
  written.plan.forEach((p, i) => p.members.forEach(({ member, offset }) => where.set(member, { pack: i, offset })));
  const order = layoutOrder(manifest.files, manifest.prefetch);
  // Packs that hold only files a later layer removed or replaced are not listed.
  const used = new Set<number>();
  for (const d of order) {
    const c = contents.get(d);
    if (!c) throw new Error(`internal: content ${d} was not staged`);
    for (const m of c.members) {
      if (m.src.kind !== 'local') continue;
      const w = where.get(m);
      if (!w) throw new Error(`internal: a member of ${d} is in no pack`);
      used.add(w.pack);
    }
  }
  const renumber = new Map<number, number>();
  const refs: PackRef[] = [];
  let unlistedBytes = 0;
  written.refs.forEach((r, i) => {
    if (used.has(i)) renumber.set(i, refs.push(r) - 1);
    else unlistedBytes += r.size;
  });
  const newCount = refs.length;
  const place = (m: StagedMember): PackMember => {
    const enc = m.encoding;
    if (m.src.kind === 'local') {
      const w = where.get(m)!;
      return { pack: renumber.get(w.pack)!, offset: w.offset, length: m.length, encoding: enc };
    }
    return { pack: newCount + oldPacks.index(m.src.image, m.src.pack), offset: m.src.offset, length: m.length, encoding: enc };
  };
  const layouts = new Map<string, Pick<IndexManifest['files'][number], 'member' | 'chunkSize' | 'chunks'>>();
  for (const d of order) {
    const c = contents.get(d)!;
    if (c.chunkSize === undefined) layouts.set(d, { member: place(c.members[0]!) });
    else layouts.set(d, { chunkSize: c.chunkSize, chunks: c.members.map((m): FileChunk => ({ ...place(m), digest: `sha256:${m.hex}` })) });
  }
  for (const f of manifest.files) Object.assign(f, layouts.get(f.digest)!);
  manifest.packs = [...refs, ...oldPacks.list()];
  return { unlisted: { packs: written.refs.length - newCount, bytes: unlistedBytes } };
}
