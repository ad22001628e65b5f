/**
 * Tar output of layer diffs: the header encoding (checked with GNU tar and a
 * small independent reader), the naive exportChanges / changesSize, and
 * streaming of overlayDiff.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ChangeKind, type Change } from '../../src/core/archive/changes.js';
import { changesSize, exportChanges, overlayDiff, overlayDiffSize } from '../../src/core/archive/export.js';
import { encodeTarHeader, tarPadding, TAR_TRAILER } from '../../src/core/archive/tarwriter.js';
import { isClass } from '../../src/core/errors.js';
import { mountOverlay, unmount } from '../../src/core/sys/mounts.js';
import { getXattr, setXattr } from '../../src/core/sys/xattr.js';

const mounted: string[] = [];
const tmpRoots: string[] = [];

afterEach(async () => {
  while (mounted.length) unmount(mounted.pop()!, { lazy: true });
  while (tmpRoots.length) await fs.rm(tmpRoots.pop()!, { recursive: true, force: true });
});

async function tmp(prefix: string): Promise<string> {
  const d = await fs.mkdtemp(path.join(os.tmpdir(), prefix));
  tmpRoots.push(d);
  return d;
}

async function collect(s: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of s) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

interface Item {
  name: string;
  type: string;
  mode: number;
  uid: number;
  linkname: string;
  xattrs: Map<string, Buffer>;
  data: Buffer;
}

/** Minimal USTAR+PAX reader that keeps PAX values as raw bytes. */
function parseTar(buf: Buffer): Item[] {
  const items: Item[] = [];
  let off = 0;
  let pax = new Map<string, Buffer>();
  while (off + 512 <= buf.length) {
    const h = buf.subarray(off, off + 512);
    off += 512;
    if (h.every((b) => b === 0)) break;
    const str = (o: number, l: number): string => {
      const f = h.subarray(o, o + l);
      const nul = f.indexOf(0);
      return f.subarray(0, nul < 0 ? l : nul).toString('utf8');
    };
    const oct = (o: number, l: number): number => parseInt(str(o, l).trim() || '0', 8);
    const type = String.fromCharCode(h[156]!);
    const size = pax.has('size') ? Number(pax.get('size')!.toString()) : oct(124, 12);
    const data = Buffer.from(buf.subarray(off, off + size));
    off += Math.ceil(size / 512) * 512;
    if (type === 'x') {
      pax = new Map();
      let pos = 0;
      while (pos < data.length) {
        const sp = data.indexOf(0x20, pos);
        const len = parseInt(data.subarray(pos, sp).toString(), 10);
        const rec = data.subarray(sp + 1, pos + len - 1);
        const eq = rec.indexOf(0x3d);
        pax.set(rec.subarray(0, eq).toString(), Buffer.from(rec.subarray(eq + 1)));
        pos += len;
      }
      continue;
    }
    const prefix = str(345, 155);
    const item: Item = {
      name: pax.get('path')?.toString() ?? (prefix ? `${prefix}/${str(0, 100)}` : str(0, 100)),
      type,
      mode: oct(100, 8),
      uid: pax.has('uid') ? Number(pax.get('uid')!.toString()) : oct(108, 8),
      linkname: pax.get('linkpath')?.toString() ?? str(157, 100),
      xattrs: new Map(),
      data,
    };
    for (const [k, v] of pax) if (k.startsWith('SCHILY.xattr.')) item.xattrs.set(k.slice(13), v);
    items.push(item);
    pax = new Map();
  }
  return items;
}

const gnuList = (tarFile: string): string[] =>
  execFileSync('tar', ['-tf', tarFile], { encoding: 'utf8' }).split('\n').filter(Boolean);

describe('tar header encoding', () => {
  it('writes what GNU tar reads: long, unsplittable and non-ASCII names, long link targets, big ids, mode 0', async () => {
    const d = await tmp('gear-tarw-');
    const longSplittable = `${'d'.repeat(60)}/${'e'.repeat(60)}/${'f'.repeat(90)}`;
    const unsplittable = 'g'.repeat(150);
    const entries = [
      { name: `${longSplittable}`, type: 'file' as const, mode: 0o100644, uid: 0, gid: 0, size: 3, mtime: 1_600_000_000 },
      { name: unsplittable, type: 'file' as const, mode: 0o100000, uid: 3_000_000, gid: 5, size: 0, mtime: 1 },
      { name: 'café/naïve', type: 'file' as const, mode: 0o100600, uid: 0, gid: 0, size: 0, mtime: -5 },
      { name: 'ln', type: 'symlink' as const, mode: 0o120777, uid: 0, gid: 0, size: 0, mtime: 0, linkname: 't'.repeat(200) },
    ];
    const parts: Buffer[] = [];
    for (const e of entries) {
      parts.push(encodeTarHeader(e));
      if (e.size) parts.push(Buffer.from('abc'), tarPadding(3));
    }
    parts.push(TAR_TRAILER);
    const buf = Buffer.concat(parts);
    expect(buf.length % 512).toBe(0);
    await fs.writeFile(`${d}/t.tar`, buf);
    expect(gnuList(`${d}/t.tar`)).toEqual([longSplittable, unsplittable, 'café/naïve', 'ln']);
    const verbose = execFileSync('tar', ['--numeric-owner', '-tvf', `${d}/t.tar`], { encoding: 'utf8' });
    expect(verbose).toContain('---------- 3000000/5');
    expect(verbose).toContain(`ln -> ${'t'.repeat(200)}`);
    const items = parseTar(buf);
    expect(items.map((i) => i.name)).toEqual([longSplittable, unsplittable, 'café/naïve', 'ln']);
    expect(items[0]!.data.toString()).toBe('abc');
    expect(items[1]!.mode).toBe(0o100000);
  });
});

describe('exportChanges / changesSize (naive diff)', () => {
  it('writes changes sorted by path, deletions as whiteouts, hard links as links, a dir as itself', async () => {
    const root = await tmp('gear-export-');
    await fs.mkdir(`${root}/a/deep`, { recursive: true });
    await fs.writeFile(`${root}/a/deep/untouched`, 'not in the change list');
    await fs.writeFile(`${root}/a/f`, 'file f\n');
    await fs.link(`${root}/a/f`, `${root}/z-link`);
    await fs.symlink('a/f', `${root}/sym`);
    await fs.chmod(`${root}/a/f`, 0o4755);
    const changes: Change[] = [
      { path: '/z-link', kind: ChangeKind.Add },
      { path: '/gone/file', kind: ChangeKind.Delete },
      { path: '/a', kind: ChangeKind.Modify },
      { path: '/a/f', kind: ChangeKind.Add },
      { path: '/sym', kind: ChangeKind.Add },
      { path: '/vanished', kind: ChangeKind.Add },
    ];
    const buf = await collect(exportChanges(root, changes));
    const items = parseTar(buf);
    expect(items.map((i) => [i.name, i.type])).toEqual([
      ['a/', '5'],
      ['a/f', '0'],
      ['gone/.wh.file', '0'],
      ['sym', '2'],
      ['z-link', '1'],
    ]);
    expect(items[1]!.mode).toBe(0o104755);
    expect(items[1]!.data.toString()).toBe('file f\n');
    expect(items[3]!.linkname).toBe('a/f');
    expect(items[4]!.linkname).toBe('a/f');
    await fs.writeFile(`${root}/t.tar`, buf);
    expect(gnuList(`${root}/t.tar`)).toEqual(['a/', 'a/f', 'gone/.wh.file', 'sym', 'z-link']);

    // ChangesSize: non-dirs that were added or modified, a hard-linked inode once.
    expect(await changesSize(root, changes)).toBe(7 + 3);
  });

  it('carries security.capability (v3 rewritten to v2, as Docker does) and never overlay or user xattrs', async () => {
    const root = await tmp('gear-export-');
    await fs.writeFile(`${root}/v2`, 'x');
    await fs.writeFile(`${root}/v3`, 'x');
    execFileSync('setcap', ['cap_net_raw+ep', `${root}/v2`]);
    const v2 = getXattr(`${root}/v2`, 'security.capability')!;
    expect(v2[3]).toBe(2);
    const v3 = Buffer.concat([v2, Buffer.from([0xe8, 0x03, 0, 0])]);
    v3[3] = 3;
    setXattr(`${root}/v3`, 'security.capability', v3);
    setXattr(`${root}/v2`, 'user.other', 'kept out');
    setXattr(`${root}/v2`, 'trusted.overlay.opaque', 'y');
    const items = parseTar(
      await collect(
        exportChanges(root, [
          { path: '/v2', kind: ChangeKind.Add },
          { path: '/v3', kind: ChangeKind.Add },
        ]),
      ),
    );
    expect([...items[0]!.xattrs.keys()]).toEqual(['security.capability']);
    expect(items[0]!.xattrs.get('security.capability')).toEqual(v2);
    expect(items[1]!.xattrs.get('security.capability')).toEqual(v2);

    // GNU tar restores the raw bytes.
    await fs.writeFile(`${root}/t.tar`, await collect(exportChanges(root, [{ path: '/v2', kind: ChangeKind.Add }])));
    await fs.mkdir(`${root}/out`);
    execFileSync('tar', ['--xattrs', '--xattrs-include=*', '-xf', `${root}/t.tar`, '-C', `${root}/out`]);
    expect(getXattr(`${root}/out/v2`, 'security.capability')).toEqual(v2);
  });
});

describe('overlayDiff streaming', () => {
  async function layerWithBigMetacopyFile(): Promise<{ upper: string; lowers: string[]; merged: string; digest: string }> {
    const root = await tmp('gear-stream-');
    for (const d of ['lower', 'upper', 'work', 'merged']) await fs.mkdir(`${root}/${d}`);
    const fh = await fs.open(`${root}/lower/big`, 'w');
    const hash = createHash('sha256');
    const block = Buffer.alloc(1 << 20);
    for (let i = 0; i < 48; i++) {
      block.fill(i);
      hash.update(block);
      await fh.write(block);
    }
    await fh.close();
    mountOverlay(`${root}/merged`, {
      lowers: [`${root}/lower`],
      upper: `${root}/upper`,
      work: `${root}/work`,
      extra: ['metacopy=on', 'redirect_dir=on'],
    });
    mounted.push(`${root}/merged`);
    await fs.chmod(`${root}/merged/big`, 0o600); // metadata-only copy-up
    expect(getXattr(`${root}/upper/big`, 'trusted.overlay.metacopy')).not.toBeNull();
    return { upper: `${root}/upper`, lowers: [`${root}/lower`], merged: `${root}/merged`, digest: hash.digest('hex') };
  }

  it('streams a metacopy file with its data from below, chunk by chunk', async () => {
    const l = await layerWithBigMetacopyFile();
    const hash = createHash('sha256');
    let bytes = 0;
    let biggest = 0;
    let headerSeen = false;
    for await (const chunk of overlayDiff(l)) {
      const c = chunk as Buffer;
      if (!headerSeen) {
        headerSeen = true;
        expect(parseTar(Buffer.concat([c, Buffer.alloc(1024)]))[0]).toMatchObject({ name: 'big', mode: 0o100600 });
        continue;
      }
      biggest = Math.max(biggest, c.length);
      const take = Math.min(c.length, 48 * (1 << 20) - bytes);
      if (take > 0) hash.update(c.subarray(0, take));
      bytes += c.length;
    }
    expect(hash.digest('hex')).toBe(l.digest);
    expect(biggest).toBeLessThanOrEqual(1 << 20);
    expect(await overlayDiffSize(l)).toBe(48 * (1 << 20));
  });

  it('can be abandoned midway without leaking open files', async () => {
    const l = await layerWithBigMetacopyFile();
    const fdsBefore = readdirSync('/proc/self/fd').length;
    const s = overlayDiff(l);
    let n = 0;
    for await (const _ of s) {
      if (++n === 3) break; // destroys the stream
    }
    await new Promise((r) => setTimeout(r, 50));
    expect(readdirSync('/proc/self/fd').length).toBeLessThanOrEqual(fdsBefore);
  });

  it('refuses to guess file data when the merged view is not given', async () => {
    const l = await layerWithBigMetacopyFile();
    const err = await collect(overlayDiff({ ...l, merged: '' })).catch((e: unknown) => e);
    expect(isClass(err, 'FailedPrecondition')).toBe(true);
  });
});
