/**
 * Deterministic corpus of hostile layer tars through the real apply code
 * (applyLayer onto a fresh temp dir), one named case each, beyond the cases
 * of test/unit/malicious-layers.test.ts: escapes through hard links,
 * GNU long names and PAX link paths, whiteout and opaque markers in odd
 * places, trusted.overlay.* / user.overlay.* xattrs it does not cover, huge
 * and malformed PAX records, base-256 and negative numeric fields, device
 * nodes, an entry after a single zero block.
 *
 * Every case: a sentinel tree next to the root is unchanged, nothing
 * appears next to the root, no trusted.overlay.* xattr is in the result but
 * the opaque markers apply sets itself, and a refused layer is an
 * InvalidArgument that leaves the root empty.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { applyLayer } from '../../src/core/archive/apply.js';
import { GearError } from '../../src/core/errors.js';
import { getXattr, listXattrs } from '../../src/core/sys/xattr.js';
import { foreignOverlayXattrs, treeSnapshot } from '../helpers/tree-check.js';
import { headerBlock, rawTar, streamOf, type RawEntry } from '../unit/fixtures/tarbuild.js';

type Expect = { refused: RegExp } | { check: (root: string) => void };

interface Case {
  name: string;
  tar: () => Buffer;
  expect: Expect;
}

const raw = (entries: RawEntry[]) => () => rawTar(entries);

/** A tar from raw 512-byte blocks and data (for GNU L/K entries and odd numeric fields). */
function blocks(...parts: Buffer[]): Buffer {
  return Buffer.concat([...parts.map((p) => Buffer.concat([p, Buffer.alloc((512 - (p.length % 512)) % 512)])), Buffer.alloc(1024)]);
}

function withField(h: Buffer, at: number, field: Buffer): Buffer {
  field.copy(h, at);
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of h) sum += x;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
  return h;
}

const b256 = (n: number, width: number) => {
  const b = Buffer.alloc(width);
  b[0] = 0x80;
  let v = n;
  for (let i = width - 1; i > 0 && v > 0; i--, v = Math.floor(v / 256)) b[i] = v % 256;
  return b;
};

const lst = (root: string, p: string) => fs.lstatSync(path.join(root, p));

const CASES: Case[] = [
  // --- escapes through links and extension headers
  { name: 'hard link through a symlink to the sentinel (l -> ../outside, h => l/victim)', tar: raw([{ name: 'l', typeflag: '2', linkname: '../outside' }, { name: 'h', typeflag: '1', linkname: 'l/victim' }]), expect: { refused: /symlink/ } },
  { name: 'PAX linkpath of a hard link escapes (../outside/victim)', tar: raw([{ name: 'h', typeflag: '1', linkname: 'x', pax: { linkpath: '../outside/victim' } }]), expect: { refused: /escapes/ } },
  { name: 'GNU long name escapes (L: ../../victim)', tar: () => blocks(headerBlock({ name: '././@LongLink', typeflag: 'L', size: 13 }), Buffer.from('../../victim\0'), headerBlock({ name: 'harmless', data: 'x' }), Buffer.from('x')), expect: { refused: /escapes/ } },
  { name: 'GNU long link of a hard link escapes (K: ../outside/victim)', tar: () => blocks(headerBlock({ name: '././@LongLink', typeflag: 'K', size: 18 }), Buffer.from('../outside/victim\0'), headerBlock({ name: 'h', typeflag: '1', linkname: 'x' })), expect: { refused: /escapes/ } },
  { name: 'symlink loop (a -> b, b -> a), then a/x', tar: raw([{ name: 'a', typeflag: '2', linkname: 'b' }, { name: 'b', typeflag: '2', linkname: 'a' }, { name: 'a/x', data: 'x' }]), expect: { refused: /symlink/ } },
  { name: 'PAX symlink target to /etc/shadow, then a file through it', tar: raw([{ name: 's', typeflag: '2', linkname: 'x', pax: { linkpath: '/etc' } }, { name: 's/shadow', data: 'pwned' }]), expect: { refused: /symlink/ } },
  { name: 'symlink to the sentinel replaced by a directory entry: the dir is real, nothing outside changes', tar: raw([{ name: 'a', typeflag: '2', linkname: '../outside' }, { name: 'a', typeflag: '5', mode: 0o777 }, { name: 'a/victim', data: 'inside' }]), expect: { check: (r) => expect(lst(r, 'a').isDirectory()).toBe(true) } },
  { name: 'hard link to a symlink that points outside, then a file at the link path', tar: raw([{ name: 's', typeflag: '2', linkname: '../outside/victim' }, { name: 'h', typeflag: '1', linkname: 's' }, { name: 'h', data: 'replaced' }]), expect: { check: (r) => expect(fs.readFileSync(path.join(r, 'h'), 'utf8')).toBe('replaced') } },
  { name: 'backslashes are literal name bytes, not separators (a\\..\\..\\x)', tar: raw([{ name: 'a\\..\\..\\x', data: 'x' }]), expect: { check: (r) => expect(fs.readdirSync(r)).toEqual(['a\\..\\..\\x']) } },
  { name: 'symlink target of 5000 bytes (PAX linkpath)', tar: raw([{ name: 's', typeflag: '2', linkname: 'x', pax: { linkpath: 'a/'.repeat(2500) } }]), expect: { refused: /symlink target is longer/ } },
  { name: 'PAX path empty', tar: raw([{ name: 'f', data: 'x', pax: { path: '' } }]), expect: { refused: /corrupt.*PAX path/ } },
  { name: 'PAX linkpath with a NUL byte', tar: raw([{ name: 's', typeflag: '2', linkname: 'x', pax: { linkpath: 'a\0b' } }]), expect: { refused: /NUL/ } },
  // --- whiteouts and opaque markers in odd places
  { name: 'opaque marker at the layer root', tar: raw([{ name: '.wh..wh..opq', data: '' }]), expect: { check: (r) => expect(getXattr(r, 'trusted.overlay.opaque')?.toString()).toBe('y') } },
  { name: 'opaque marker as a directory entry', tar: raw([{ name: 'd/.wh..wh..opq', typeflag: '5' }]), expect: { check: (r) => expect(getXattr(path.join(r, 'd'), 'trusted.overlay.opaque')?.toString()).toBe('y') } },
  { name: 'opaque marker used as a parent directory (.wh..wh..opq/x): skipped, nothing written', tar: raw([{ name: '.wh..wh..opq/x', data: 'x' }]), expect: { check: (r) => expect(fs.readdirSync(r)).toEqual([]) } },
  { name: 'opaque marker deep as a parent (a/.wh..wh..opq/b/c)', tar: raw([{ name: 'a/.wh..wh..opq/b/c', data: 'x' }]), expect: { check: (r) => expect(fs.existsSync(path.join(r, 'a', '.wh..wh..opq'))).toBe(false) } },
  { name: 'opaque marker carrying data', tar: raw([{ name: 'd/.wh..wh..opq', data: 'payload' }]), expect: { check: (r) => expect(fs.readdirSync(path.join(r, 'd'))).toEqual([]) } },
  { name: 'whiteout as a symlink entry becomes a 0/0 char device, not a link', tar: raw([{ name: '.wh.x', typeflag: '2', linkname: '../outside/victim' }]), expect: { check: (r) => expect(lst(r, 'x').isCharacterDevice() && lst(r, 'x').rdev === 0).toBe(true) } },
  { name: 'file after its own whiteout replaces the whiteout', tar: raw([{ name: '.wh.x', data: '' }, { name: 'x', data: 'back' }]), expect: { check: (r) => expect(lst(r, 'x').isFile()).toBe(true) } },
  { name: 'whiteout of a file this layer created', tar: raw([{ name: 'x', data: 'x' }, { name: '.wh.x', data: '' }]), expect: { refused: /which this layer also creates/ } },
  { name: 'AUFS hard-link dir entries (.wh..wh.plnk/…) are skipped', tar: raw([{ name: '.wh..wh.plnk/123.456', data: 'x' }, { name: '.wh..wh.aufs', data: '' }]), expect: { check: (r) => expect(fs.readdirSync(r)).toEqual([]) } },
  // --- overlay xattrs from PAX
  { name: 'SCHILY.xattr.trusted.overlay.origin and .upper dropped', tar: raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.trusted.overlay.origin': 'abc', 'SCHILY.xattr.trusted.overlay.upper': 'def' } }]), expect: { check: (r) => expect(listXattrs(path.join(r, 'f'))).toEqual([]) } },
  { name: 'trusted.overlay.opaque=y on a regular file dropped', tar: raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.trusted.overlay.opaque': 'y' } }]), expect: { check: (r) => expect(listXattrs(path.join(r, 'f'))).toEqual([]) } },
  { name: 'trusted.overlay.opaque=x on a directory dropped', tar: raw([{ name: 'd', typeflag: '5', pax: { 'SCHILY.xattr.trusted.overlay.opaque': 'x' } }]), expect: { check: (r) => expect(listXattrs(path.join(r, 'd'))).toEqual([]) } },
  { name: 'trusted.overlay.* on a symlink and on a whiteout dropped', tar: raw([{ name: 's', typeflag: '2', linkname: 't', pax: { 'SCHILY.xattr.trusted.overlay.redirect': '/x' } }, { name: '.wh.w', data: '', pax: { 'SCHILY.xattr.trusted.overlay.metacopy': '' } }]), expect: { check: (r) => expect([...listXattrs(path.join(r, 's')), ...listXattrs(path.join(r, 'w'))]).toEqual([]) } },
  { name: 'trusted.overlay.* on the layer root (".") dropped', tar: raw([{ name: '.', typeflag: '5', pax: { 'SCHILY.xattr.trusted.overlay.redirect': '/etc' } }]), expect: { check: (r) => expect(listXattrs(r)).toEqual([]) } },
  { name: 'xattr with an empty name (SCHILY.xattr.)', tar: raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.': 'v' } }]), expect: { refused: /layer entry "f": an xattr with an empty name/ } },
  { name: 'xattr name of 300 bytes', tar: raw([{ name: 'f', data: 'x', pax: { [`SCHILY.xattr.user.${'n'.repeat(295)}`]: 'v' } }]), expect: { refused: /layer entry "f": xattr "user\.n+.*name is longer than 255 bytes/ } },
  { name: 'xattr value of 70,000 bytes', tar: raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.user.big': 'v'.repeat(70_000) } }]), expect: { refused: /layer entry "f": xattr "user\.big": a value of 70000 bytes is beyond 65536/ } },
  // --- huge or malformed PAX
  { name: 'PAX header of 1 MiB + 1 with the default limits', tar: raw([{ name: 'f', data: 'x', pax: { comment: 'c'.repeat(1024 * 1024) } }]), expect: { refused: /limit|exceeds/ } },
  { name: 'PAX size -1', tar: raw([{ name: 'f', data: 'x', pax: { size: '-1' } }]), expect: { refused: /corrupt.*decimal/ } },
  { name: 'PAX size larger than the data that follows', tar: raw([{ name: 'f', data: 'x', pax: { size: '100000' } }]), expect: { refused: /corrupt|Unexpected end/ } },
  { name: 'PAX mtime with a letter', tar: raw([{ name: 'f', data: 'x', pax: { mtime: '1.5e3' } }]), expect: { refused: /corrupt.*time/ } },
  { name: 'PAX uid 2^32-2 (the largest valid owner) is honoured', tar: raw([{ name: 'f', data: 'x', pax: { uid: '4294967294' } }]), expect: { check: (r) => expect(lst(r, 'f').uid).toBe(4294967294) } },
  // --- numeric fields
  { name: 'base-256 size (5, exact)', tar: () => blocks(withField(headerBlock({ name: 'f' }), 124, b256(5, 12)), Buffer.from('hello')), expect: { check: (r) => expect(fs.readFileSync(path.join(r, 'f'), 'utf8')).toBe('hello') } },
  { name: 'base-256 uid 70000 (beyond octal) is honoured', tar: () => blocks(withField(headerBlock({ name: 'f', data: 'x' }), 108, b256(70_000, 8)), Buffer.from('x')), expect: { check: (r) => expect(lst(r, 'f').uid).toBe(70_000) } },
  // tar-stream decodes all-0xff (-1) as -0; apply then writes mode 0. Go would give FileMode(-1): every permission
  // and setuid/setgid/sticky bit. Never the latter here.
  { name: 'base-256 negative mode (all 0xff) never becomes setuid', tar: () => blocks(withField(headerBlock({ name: 'f', data: 'x' }), 100, Buffer.alloc(8, 0xff)), Buffer.from('x')), expect: { check: (r) => expect(lst(r, 'f').mode & 0o7777).toBe(0) } },
  { name: 'base-256 size with first byte 0x81 (undecodable)', tar: () => blocks(withField(headerBlock({ name: 'f' }), 124, Buffer.from([0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]))), expect: { refused: /size field is not a valid number/ } },
  { name: 'mtime before the epoch (PAX -99999999999) becomes the epoch', tar: raw([{ name: 'f', data: 'x', pax: { mtime: '-99999999999' } }]), expect: { check: (r) => expect(lst(r, 'f').mtimeMs).toBe(0) } },
  // --- device nodes and special files
  { name: 'char device 1:3 stays inside the root', tar: raw([{ name: 'dev/null', typeflag: '3', devmajor: 1, devminor: 3, mode: 0o666 }]), expect: { check: (r) => expect(lst(r, 'dev/null').isCharacterDevice()).toBe(true) } },
  { name: 'block device 8:0 stays inside the root', tar: raw([{ name: 'dev/sda', typeflag: '4', devmajor: 8, devminor: 0 }]), expect: { check: (r) => expect(lst(r, 'dev/sda').isBlockDevice()).toBe(true) } },
  { name: 'device minor 0x100000 (out of range)', tar: raw([{ name: 'dev/x', typeflag: '3', devmajor: 1, devminor: 0x100000 }]), expect: { refused: /layer entry "dev\/x": devminor 1048576 is beyond 1048575/ } },
  { name: 'fifo carrying data', tar: raw([{ name: 'p', typeflag: '6', data: 'x' }]), expect: { refused: /must not carry data/ } },
  { name: 'hard link to a device node created earlier', tar: raw([{ name: 'c', typeflag: '3', devmajor: 1, devminor: 5 }, { name: 'h', typeflag: '1', linkname: 'c' }]), expect: { check: (r) => expect(lst(r, 'h').ino).toBe(lst(r, 'c').ino) } },
  { name: 'directory entry with a size and no data (tar-stream would wait forever for it)', tar: () => Buffer.concat([headerBlock({ name: 'd', typeflag: '5', size: 1 })]), expect: { refused: /must not carry data/ } },
  // --- the root and the archive's end
  { name: 'the root as a regular file entry (".")', tar: raw([{ name: '.', data: 'x' }]), expect: { refused: /root must be a directory/ } },
  { name: 'an entry after a single zero block', tar: () => Buffer.concat([rawTar([{ name: 'a', data: 'a' }], false), Buffer.alloc(512), rawTar([{ name: 'smuggled', data: 's' }])]), expect: { refused: /after its end-of-archive/ } },
  { name: 'a directory replaced by a file removes its subtree, inside the root only', tar: raw([{ name: 'd', typeflag: '5' }, { name: 'd/x', data: 'x' }, { name: 'd', data: 'file now' }]), expect: { check: (r) => expect(lst(r, 'd').isFile()).toBe(true) } },
];

let tmp: string;
let root: string;
let outside: string;
let before: string;


beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-hostile-tar-'));
  root = path.join(tmp, 'layer');
  outside = path.join(tmp, 'outside');
  fs.mkdirSync(root);
  fs.mkdirSync(path.join(outside, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(outside, 'victim'), 'untouched', { mode: 0o600 });
  fs.writeFileSync(path.join(outside, 'etc', 'shadow'), 'root:*:1::::::\n', { mode: 0o600 });
  before = treeSnapshot(outside);
});

afterEach(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe(`hostile layer tars through applyLayer (${CASES.length} cases)`, () => {
  it('has at least 30 cases', () => {
    expect(CASES.length).toBeGreaterThanOrEqual(30);
  });

  it.each(CASES)('$name', async (c) => {
    let timer: NodeJS.Timeout | undefined;
    const outcome = await Promise.race([
      applyLayer(streamOf(c.tar(), 1000), root).then(
        () => ({ ok: true as const }),
        (err: unknown) => ({ ok: false as const, err }),
      ),
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error('applyLayer did not settle within 10 s')), 10_000))),
    ]);
    clearTimeout(timer);
    if ('refused' in c.expect) {
      expect(outcome.ok).toBe(false);
      const err = (outcome as { err: unknown }).err;
      expect(err).toBeInstanceOf(GearError);
      expect((err as GearError).class).toBe('InvalidArgument');
      expect((err as GearError).message).toMatch(c.expect.refused);
      expect(fs.readdirSync(root)).toEqual([]);
      expect(listXattrs(root)).toEqual([]);
    } else {
      if (!outcome.ok) throw (outcome as { err: unknown }).err;
      c.expect.check(root);
    }
    expect(foreignOverlayXattrs(root)).toEqual([]);
    expect(treeSnapshot(outside)).toBe(before);
    expect(fs.readdirSync(tmp).sort()).toEqual(['layer', 'outside']);
  });
});
