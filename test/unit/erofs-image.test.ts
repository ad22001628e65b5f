/**
 * The EROFS writer checked by the kernel: images are mounted (file-backed
 * EROFS, Linux 6.12+) and every name, type, size, owner, mode, time, xattr,
 * link count and symlink target is read back through the VFS; an overlay
 * then takes one as a metacopy lower over a data-only layer.
 * Needs root.
 */
import { randomBytes } from 'node:crypto';
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { buildErofsImage, EROFS_MAGIC, type ErofsNode } from '../../src/core/layers/erofs-image.js';
import { indexTreeFromEntries, mountIndexImage, probeIndexImages, writeIndexImage } from '../../src/core/layers/index-image.js';
import { native, constants } from '../../src/core/sys/native.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';
import { getXattr, listXattrs } from '../../src/core/sys/xattr.js';
import { indexTarHeader as hdr } from './fixtures/tarbuild.js';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-erofs-'));
});
afterEach(async () => {
  for (const m of mountsUnder(dir)) native.umount2(m.mountPoint, constants.MNT_DETACH);
  await fs.rm(dir, { recursive: true, force: true });
});

const node = (type: ErofsNode['type'], extra: Partial<ErofsNode> = {}): ErofsNode => ({
  type,
  mode: 0o755,
  uid: 0,
  gid: 0,
  mtimeSec: 1_700_000_000,
  mtimeNsec: 0,
  xattrs: [],
  ...(type === 'dir' ? { children: new Map() } : {}),
  ...extra,
});

function mountImage(img: Buffer, name = 'img'): string {
  const file = path.join(dir, `${name}.erofs`);
  fsSync.writeFileSync(file, img);
  const mnt = path.join(dir, `${name}-mnt`);
  mountIndexImage(file, mnt);
  return mnt;
}

describe('EROFS images of index trees', () => {
  it('this kernel mounts EROFS image files (the store would fall back to directories otherwise)', () => {
    expect(probeIndexImages(dir)).toBeUndefined();
  });

  it('shows every attribute of every kind of entry exactly as written', () => {
    const root = node('dir', { mode: 0o711, uid: 7, gid: 8, mtimeSec: 1_600_000_000, mtimeNsec: 123_456_789 });
    const kids = root.children!;
    const f = node('file', { mode: 0o4755, uid: 1000, gid: 1001, size: 123_456, mtimeNsec: 999, xattrs: [['trusted.overlay.metacopy', Buffer.alloc(0)], ['trusted.overlay.redirect', Buffer.from('/sha256/ab/abcd')], ['user.note', Buffer.from('hello')]] });
    kids.set('file', f);
    kids.set('hardlink', f);
    kids.set('empty', node('file', { mode: 0o600, size: 0 }));
    kids.set('huge', node('file', { mode: 0o644, size: 3 * 2 ** 40 }));
    kids.set('sym', node('symlink', { mode: 0o777, target: '../etc/os-release' }));
    kids.set('longsym', node('symlink', { mode: 0o777, target: 'd/'.repeat(2000) }));
    kids.set('null', node('char', { mode: 0o666, major: 1, minor: 3 }));
    kids.set('disk', node('block', { mode: 0o660, major: 259, minor: 70_000 }));
    kids.set('fifo', node('fifo', { mode: 0o600 }));
    kids.set('acl', node('dir', { xattrs: [['system.posix_acl_default', Buffer.from([2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255, 4, 0, 5, 0, 255, 255, 255, 255, 32, 0, 5, 0, 255, 255, 255, 255])]] }));
    const big = node('dir', { uid: 5, gid: 6 });
    // Enough entries for many directory blocks, names of every length.
    for (let i = 0; i < 2_000; i++) big.children!.set(`${'n'.repeat(1 + (i % 200))}-${i}`, node('file', { mode: 0o644, size: i }));
    kids.set('big', big);
    kids.set('deep', node('dir', { children: new Map([['er', node('dir', { children: new Map([['est', node('file', { size: 1 })]]) })]]) }));

    const img = buildErofsImage(root);
    expect(img.readUInt32LE(1024)).toBe(EROFS_MAGIC);
    expect(img.length % 4096).toBe(0);
    const mnt = mountImage(img);

    const rst = fsSync.lstatSync(mnt);
    expect([rst.mode & 0o7777, rst.uid, rst.gid, rst.nlink]).toEqual([0o711, 7, 8, 2 + 3]); // acl, big, deep
    expect(rst.mtime.getTime()).toBe(1_600_000_000_123);
    expect(fsSync.readdirSync(mnt).sort()).toEqual([...kids.keys()].sort());

    const fst = fsSync.lstatSync(path.join(mnt, 'file'));
    expect(fst.isFile()).toBe(true);
    expect([fst.size, fst.mode & 0o7777, fst.uid, fst.gid, fst.nlink]).toEqual([123_456, 0o4755, 1000, 1001, 2]);
    expect(fsSync.lstatSync(path.join(mnt, 'hardlink')).ino).toBe(fst.ino);
    expect(listXattrs(path.join(mnt, 'file')).sort()).toEqual(['trusted.overlay.metacopy', 'trusted.overlay.redirect', 'user.note']);
    expect(getXattr(path.join(mnt, 'file'), 'trusted.overlay.redirect')?.toString()).toBe('/sha256/ab/abcd');
    expect(getXattr(path.join(mnt, 'file'), 'user.note')?.toString()).toBe('hello');
    expect(getXattr(path.join(mnt, 'acl'), 'system.posix_acl_default')?.length).toBe(28);
    // A file's own data is a hole: zeros, whatever its size.
    expect(fsSync.readFileSync(path.join(mnt, 'file')).equals(Buffer.alloc(123_456))).toBe(true);
    expect(fsSync.lstatSync(path.join(mnt, 'huge')).size).toBe(3 * 2 ** 40);
    expect(fsSync.lstatSync(path.join(mnt, 'empty')).size).toBe(0);

    expect(fsSync.readlinkSync(path.join(mnt, 'sym'))).toBe('../etc/os-release');
    expect(fsSync.readlinkSync(path.join(mnt, 'longsym'))).toBe('d/'.repeat(2000));
    const cst = fsSync.lstatSync(path.join(mnt, 'null'));
    expect(cst.isCharacterDevice()).toBe(true);
    expect(cst.rdev).toBe(0x103);
    const bst = fsSync.lstatSync(path.join(mnt, 'disk'));
    expect(bst.isBlockDevice()).toBe(true);
    expect([Math.floor(bst.rdev / 256) & 0xfff, (bst.rdev & 0xff) | ((bst.rdev >> 12) & 0xfff00)]).toEqual([259, 70_000]);
    expect(fsSync.lstatSync(path.join(mnt, 'fifo')).isFIFO()).toBe(true);

    const names = fsSync.readdirSync(path.join(mnt, 'big'));
    expect(names.length).toBe(2_000);
    expect(new Set(names)).toEqual(new Set(big.children!.keys()));
    // Lookups by name (binary search over blocks) find every entry with its own size.
    for (const [name, n] of big.children!) expect(fsSync.lstatSync(path.join(mnt, 'big', name)).size).toBe(n.size);
    expect(fsSync.existsSync(path.join(mnt, 'big', 'n-missing'))).toBe(false);
    expect(fsSync.lstatSync(path.join(mnt, 'deep/er/est')).size).toBe(1);
  });

  it('is refused for what EROFS cannot store, before anything is written', () => {
    const root = node('dir');
    root.children!.set('x', node('file', { xattrs: [['system.other', Buffer.from('v')]] }));
    expect(() => buildErofsImage(root)).toThrow(/xattr "system.other": EROFS stores only security/);
    const d = node('dir');
    const root2 = node('dir');
    root2.children!.set('a', d);
    root2.children!.set('b', d);
    expect(() => buildErofsImage(root2)).toThrow(/hard-linked/);
  });

  it('serves as overlay lower of metacopy files whose data lives in a data-only layer', async () => {
    const data = path.join(dir, 'pool');
    const content = randomBytes(10_000);
    await fs.mkdir(path.join(data, 'sha256/ab'), { recursive: true });
    await fs.writeFile(path.join(data, 'sha256/ab/content'), content);
    const entries = [hdr('etc', 'dir'), hdr('etc/data', 'file', { mode: 0o640, uid: 3, gid: 4 }), hdr('etc/empty', 'file'), hdr('etc/alias', 'link', { linkname: 'etc/data' })];
    const digest = `sha256:ab${'0'.repeat(62)}`;
    const { root, result } = indexTreeFromEntries({ version: 1, files: [{ path: 'etc/data', digest, size: content.length }] }, entries);
    expect(result.files).toBe(1);
    // The redirect names the pool path of the digest; point it at our file.
    const dataNode = root.children!.get('etc')!.children!.get('data')!;
    dataNode.xattrs = dataNode.xattrs.map(([n, v]) => (n === 'trusted.overlay.redirect' ? [n, Buffer.from('/sha256/ab/content')] : [n, v]));
    const image = path.join(dir, 'index.erofs');
    writeIndexImage(image, root);
    const lower = path.join(dir, 'index');
    mountIndexImage(image, lower);
    const merged = path.join(dir, 'merged');
    await fs.mkdir(merged);
    native.mount('overlay', merged, 'overlay', constants.MS_RDONLY, `lowerdir=${lower}::${data},metacopy=on,redirect_dir=on,index=off`);
    expect(await fs.readFile(path.join(merged, 'etc/data'))).toEqual(content);
    expect(await fs.readFile(path.join(merged, 'etc/alias'))).toEqual(content);
    const st = await fs.stat(path.join(merged, 'etc/data'));
    expect([st.mode & 0o7777, st.uid, st.gid, st.nlink]).toEqual([0o640, 3, 4, 2]);
    expect((await fs.stat(path.join(merged, 'etc/empty'))).size).toBe(0);
    // The overlay keeps its own reference: detaching the image's mount does not break it.
    native.umount2(lower, constants.MNT_DETACH);
    expect(await fs.readFile(path.join(merged, 'etc/data'))).toEqual(content);
  });
});
