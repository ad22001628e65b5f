/**
 * Malicious layer corpus: each case is a tar that tries to write outside the
 * layer, plant overlay metadata, or exhaust the extractor. Every case checks
 * that a sentinel tree next to dest is byte-for-byte unchanged and, for
 * refused layers, that dest is left empty and the error is InvalidArgument.
 * Cases follow containerd's TestBreakouts and moby's TestUntar* families and
 * the CVE classes in docs/reference/reliability.md §2.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { applyLayer } from '../../src/core/archive/apply.js';
import { GearError } from '../../src/core/errors.js';
import { getXattr, listXattrs } from '../../src/core/sys/xattr.js';
import { headerBlock, packTar, type PackEntry, rawTar, type RawEntry, streamOf } from './fixtures/tarbuild.js';

let tmp: string;
let dest: string;
let outside: string;

/** path → content/link/mode snapshot of a tree, to prove nothing changed. */
function snapshot(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.lstatSync(p);
      const x = listXattrs(p).sort().join(',');
      let what = `${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.mtimeMs} ${x}`;
      if (st.isSymbolicLink()) what += ` -> ${fs.readlinkSync(p)}`;
      else if (st.isFile()) what += ` ${fs.readFileSync(p, 'utf8')}`;
      out.push(`${path.relative(dir, p)} ${what}`);
      if (st.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return out;
}

let before: string[];

beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gear-malicious-'));
  dest = path.join(tmp, 'layer');
  outside = path.join(tmp, 'outside');
  fs.mkdirSync(dest);
  fs.mkdirSync(path.join(outside, 'etc'), { recursive: true });
  fs.writeFileSync(path.join(outside, 'etc', 'passwd'), 'root:x:0:0\n', { mode: 0o644 });
  fs.writeFileSync(path.join(outside, 'victim'), 'untouched', { mode: 0o600 });
  before = snapshot(tmp).filter((l) => !l.startsWith('layer'));
});

afterEach(() => {
  // the sentinel tree must be unchanged whatever the case did
  expect(snapshot(tmp).filter((l) => !l.startsWith('layer'))).toEqual(before);
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function refused(tar: Buffer, message: RegExp, chunk = 1000): Promise<GearError> {
  const err = await applyLayer(streamOf(tar, chunk), dest).then(
    () => new Error('layer was accepted'),
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(GearError);
  expect((err as GearError).class).toBe('InvalidArgument');
  expect((err as GearError).message).toMatch(message);
  expect(fs.readdirSync(dest)).toEqual([]);
  expect(listXattrs(dest)).toEqual([]);
  return err as GearError;
}

const pk = (entries: PackEntry[]): Promise<Buffer> => packTar(entries);
const raw = (entries: RawEntry[], end = true): Buffer => rawTar(entries, end);

describe('path traversal', () => {
  it('refuses ../ in a name, naming the entry', async () => {
    const err = await refused(await pk([{ name: 'ok', data: 'x' }, { name: '../outside/victim', data: 'pwned' }]), /escapes the layer root/);
    expect(err.message).toContain('"../outside/victim"');
  });

  it('refuses .. hidden inside a name (a/../../outside/victim)', async () => {
    await refused(await pk([{ name: 'a/../../outside/victim', data: 'pwned' }]), /escapes/);
  });

  it('keeps absolute names inside the root, as Docker does', async () => {
    await applyLayer(streamOf(await pk([{ name: `/${outside}/victim`, data: 'inside' }, { name: '/abs', data: 'a' }])), dest);
    expect(fs.readFileSync(path.join(dest, outside, 'victim'), 'utf8')).toBe('inside');
    expect(fs.readFileSync(path.join(dest, 'abs'), 'utf8')).toBe('a');
  });

  it('refuses an absolute path that normalises outside (/../../victim)', async () => {
    await refused(raw([{ name: '/../../victim', data: 'pwned' }]), /escapes/);
  });

  it('refuses a PAX path that escapes while the ustar name looks harmless', async () => {
    await refused(raw([{ name: 'harmless', data: 'pwned', pax: { path: '../outside/victim' } }]), /escapes/);
  });
});

describe('symlink parents', () => {
  it('refuses a file through a symlink to / (a -> /, a/etc/x)', async () => {
    await refused(await pk([{ name: 'a', type: 'symlink', linkname: '/' }, { name: 'a/etc/x', data: 'pwned' }]), /through a symlink/);
  });

  it('refuses a file through a relative symlink (a -> .., a/outside/victim)', async () => {
    await refused(
      await pk([{ name: 'a', type: 'symlink', linkname: '..' }, { name: 'a/outside/victim', data: 'pwned' }]),
      /through a symlink/,
    );
  });

  it('refuses a file through an absolute symlink to the sentinel dir', async () => {
    await refused(await pk([{ name: 'lnk', type: 'symlink', linkname: outside }, { name: 'lnk/victim', data: 'pwned' }]), /symlink/);
  });

  it('refuses a chain of symlinks (node-tar CVE-2026-26960 shape)', async () => {
    await refused(
      await pk([
        { name: 'a/b/c/', type: 'directory' },
        { name: 'a/b/c/up', type: 'symlink', linkname: '../..' },
        { name: 'a/b/escape', type: 'symlink', linkname: 'c/up/../..' },
        { name: 'a/b/escape/outside/victim', data: 'pwned' },
      ]),
      /symlink/,
    );
  });

  it('refuses a directory entry through a symlink parent', async () => {
    await refused(await pk([{ name: 'a', type: 'symlink', linkname: outside }, { name: 'a/newdir/', type: 'directory', mode: 0o777 }]), /symlink/);
  });

  it('defeats the symlink-replaced-by-directory trick (symlink, then dir of the same name, then a file in it)', async () => {
    await applyLayer(
      streamOf(await pk([
        { name: 'a', type: 'symlink', linkname: outside },
        { name: 'a/', type: 'directory' },
        { name: 'a/victim', data: 'inside' },
      ])),
      dest,
    );
    expect(fs.lstatSync(path.join(dest, 'a')).isDirectory()).toBe(true);
    expect(fs.readFileSync(path.join(dest, 'a/victim'), 'utf8')).toBe('inside');
  });

  it('refuses a directory replaced by a symlink and then written through', async () => {
    await refused(
      await pk([{ name: 'a/', type: 'directory' }, { name: 'a', type: 'symlink', linkname: outside }, { name: 'a/victim', data: 'pwned' }]),
      /symlink/,
    );
  });

  it('replaces a symlink by a duplicate file entry instead of writing through it', async () => {
    await applyLayer(
      streamOf(await pk([
        { name: 'f', type: 'symlink', linkname: path.join(outside, 'victim') },
        { name: 'f', data: 'replaced', mode: 0o777 },
      ])),
      dest,
    );
    const st = fs.lstatSync(path.join(dest, 'f'));
    expect(st.isFile()).toBe(true);
    expect(st.mode & 0o777).toBe(0o777);
  });

  it('never chmods or chowns through a symlink (metadata of a symlink entry stays on the link)', async () => {
    await applyLayer(
      streamOf(await pk([{ name: 's', type: 'symlink', linkname: path.join(outside, 'victim'), mode: 0o777, uid: 1234, gid: 1234 }])),
      dest,
    );
    expect(fs.lstatSync(path.join(dest, 's')).uid).toBe(1234);
  });

  it('refuses a whiteout through a symlink parent', async () => {
    await refused(await pk([{ name: 'a', type: 'symlink', linkname: outside }, { name: 'a/.wh.victim', data: '' }]), /symlink/);
  });

  it('refuses an opaque marker through a symlink parent', async () => {
    await refused(await pk([{ name: 'a', type: 'symlink', linkname: outside }, { name: 'a/.wh..wh..opq', data: '' }]), /symlink/);
  });
});

describe('hard links', () => {
  it('refuses a hard link whose target escapes by ..', async () => {
    await refused(await pk([{ name: 'h', type: 'link', linkname: '../outside/victim' }]), /escapes/);
  });

  it('treats an absolute hard link target as inside the layer, and refuses it when absent', async () => {
    await refused(await pk([{ name: 'h', type: 'link', linkname: path.join(outside, 'victim') }]), /does not exist|not an earlier entry/);
  });

  it('refuses a hard link through a symlinked parent', async () => {
    await refused(
      await pk([{ name: 'a', type: 'symlink', linkname: outside }, { name: 'h', type: 'link', linkname: 'a/victim' }]),
      /symlink/,
    );
  });

  it('links to a symlink itself, then a chmod of the link leaves the symlink target alone (HardlinkSymlinkChmod)', async () => {
    await applyLayer(
      streamOf(await pk([
        { name: 's', type: 'symlink', linkname: path.join(outside, 'victim') },
        { name: 'h', type: 'link', linkname: 's', mode: 0o777 },
      ])),
      dest,
    );
    expect(fs.lstatSync(path.join(dest, 'h')).isSymbolicLink()).toBe(true);
  });

  it('refuses a hard link to a directory and to itself', async () => {
    await refused(await pk([{ name: 'd/', type: 'directory' }, { name: 'h', type: 'link', linkname: 'd' }]), /directory/);
    await refused(await pk([{ name: 'x', data: 'x' }, { name: 'x', type: 'link', linkname: 'x' }]), /itself/);
  });
});

describe('overlay metadata injection', () => {
  it('drops trusted.overlay.redirect/metacopy/opaque from PAX while keeping user.* on the same file', async () => {
    await applyLayer(
      streamOf(raw([
        {
          name: 'f',
          data: 'x',
          pax: {
            'SCHILY.xattr.trusted.overlay.redirect': '/etc/shadow',
            'SCHILY.xattr.trusted.overlay.metacopy': '',
            'SCHILY.xattr.user.keep': 'kept',
          },
        },
        { name: 'd', typeflag: '5', pax: { 'SCHILY.xattr.trusted.overlay.opaque': 'y', 'SCHILY.xattr.trusted.overlay.overlay.x': 'z' } },
      ])),
      dest,
    );
    expect(getXattr(path.join(dest, 'f'), 'trusted.overlay.redirect')).toBeNull();
    expect(getXattr(path.join(dest, 'f'), 'trusted.overlay.metacopy')).toBeNull();
    expect(getXattr(path.join(dest, 'f'), 'user.keep')?.toString()).toBe('kept');
    expect(listXattrs(path.join(dest, 'd')).filter((n) => n.startsWith('trusted.overlay'))).toEqual([]);
  });

  it('drops user.overlay.* (honoured by userxattr mounts)', async () => {
    await applyLayer(
      streamOf(raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.user.overlay.redirect': '/x', 'SCHILY.xattr.user.a': 'b' } }])),
      dest,
    );
    expect(listXattrs(path.join(dest, 'f'))).toEqual(['user.a']);
  });

  it('refuses whiteouts naming ., .. or nothing, and .wh. parent directories', async () => {
    await refused(await pk([{ name: 'a/.wh..', data: '' }]), /whiteout/);
    await refused(await pk([{ name: 'a/.wh...', data: '' }]), /whiteout/);
    await refused(await pk([{ name: '.wh.', data: '' }]), /whiteout/);
    await refused(await pk([{ name: '.wh.etc/passwd', data: '' }]), /reserved/);
  });
});

describe('resource exhaustion and corrupt input', () => {
  it('refuses a PAX header declaring 100 MB without reading it', async () => {
    const hdr = headerBlock({ name: 'PaxHeaders/x', typeflag: 'x', size: 100 * 1024 * 1024 });
    const input = new PassThrough();
    input.end(Buffer.concat([hdr, Buffer.alloc(64 * 1024, 0x41)]));
    const err = await applyLayer(input, dest).catch((e: unknown) => e);
    expect((err as GearError).class).toBe('InvalidArgument');
    expect((err as GearError).message).toMatch(/Header exceeds max size|limit/);
    expect(fs.readdirSync(dest)).toEqual([]);
  });

  it('refuses a PAX header over the configured limit', async () => {
    const tar = raw([{ name: 'f', data: 'x', pax: { comment: 'y'.repeat(5000) } }]);
    const err = await applyLayer(streamOf(tar), dest, { limits: { maxHeaderBytes: 4096 } }).catch((e: unknown) => e);
    expect((err as GearError).message).toMatch(/4096-byte limit/);
  });

  it('refuses a very deep path and a very long one', async () => {
    const deep = Array.from({ length: 300 }, () => 'd').join('/') + '/f';
    await refused(raw([{ name: 'f', data: 'x', pax: { path: deep } }]), /deeper than 256/);
    const long = Array.from({ length: 40 }, () => 'x'.repeat(200)).join('/');
    await refused(raw([{ name: 'f', data: 'x', pax: { path: long } }]), /longer than 4096/);
  });

  it('refuses too many entries', async () => {
    const tar = await pk(Array.from({ length: 20 }, (_, i) => ({ name: `f${i}`, data: '' })));
    const err = await applyLayer(streamOf(tar), dest, { limits: { maxEntries: 10 } }).catch((e: unknown) => e);
    expect((err as GearError).message).toMatch(/more than 10 entries/);
    expect(fs.readdirSync(dest)).toEqual([]);
  });

  it('refuses a tar larger than maxBytes (decompression bomb backstop)', async () => {
    const tar = gzipSync(await pk([{ name: 'zeros', data: Buffer.alloc(4 * 1024 * 1024) }]));
    const err = await applyLayer(streamOf(tar), dest, { limits: { maxBytes: 1024 * 1024 } }).catch((e: unknown) => e);
    expect((err as GearError).class).toBe('InvalidArgument');
    expect((err as GearError).message).toMatch(/larger than/);
    expect(fs.readdirSync(dest)).toEqual([]);
  });

  it('refuses a truncated tar and removes the files already written', async () => {
    const tar = await pk([{ name: 'first', data: 'complete' }, { name: 'second', data: Buffer.alloc(100_000, 7) }]);
    await refused(tar.subarray(0, 2048 + 512 + 50_000), /corrupt|Unexpected end/);
  });

  it('refuses a truncated gzip stream', async () => {
    const gz = gzipSync(await pk([{ name: 'a', data: Buffer.alloc(50_000, 3) }]));
    await refused(gz.subarray(0, gz.length - 20), /gzip|corrupt/);
  });

  it('refuses a garbage stream', async () => {
    const garbage = Buffer.alloc(10_000);
    for (let i = 0; i < garbage.length; i++) garbage[i] = (i * 131 + 17) & 0xff;
    await refused(garbage, /corrupt|Invalid tar header/);
  });

  it('refuses garbage after a zstd magic number', async () => {
    await refused(Buffer.concat([Buffer.from([0x28, 0xb5, 0x2f, 0xfd]), Buffer.alloc(100, 0xee)]), /zstd/);
  });

  it('refuses a file with a negative (base-256) size', async () => {
    const neg = Buffer.alloc(12, 0xff); // two's complement -1
    await refused(raw([{ name: 'f', sizeField: neg }]), /layer entry "f": size is negative \(a base-256 size field of -1\); a size is a whole number ≥ 0/);
    neg[11] = 0xfe; // -2
    await refused(raw([{ name: 'f', sizeField: neg }]), /corrupt|Invalid header|invalid size/);
  });

  it('refuses a file with a huge (base-256) size', async () => {
    const huge = Buffer.alloc(12, 0);
    huge[0] = 0x80;
    huge.fill(0xff, 2);
    await refused(raw([{ name: 'f', sizeField: huge, data: 'x' }]), /layer entry "f": size [0-9.e+]+ is not a whole number in 0…2\^53−1|corrupt/);
  });

  it('refuses a PAX size that is not a plain decimal (TARmageddon-style smuggling)', async () => {
    await refused(raw([{ name: 'f', data: 'x', pax: { size: '1x' } }]), /corrupt.*decimal/);
  });

  it('refuses a symlink entry that carries data (parsers disagree on it)', async () => {
    await refused(raw([{ name: 's', typeflag: '2', linkname: 'x', data: headerBlock({ name: 'smuggled', data: '' }) }]), /must not carry data/);
  });

  it('refuses entries after the end-of-archive marker', async () => {
    const tar = Buffer.concat([raw([{ name: 'a', data: 'a' }]), raw([{ name: 'smuggled', data: 's' }])]);
    await refused(tar, /after its end-of-archive/);
  });

  it('refuses GNU sparse entries rather than writing their map as data', async () => {
    await refused(raw([{ name: 'sp', typeflag: 'S', data: 'x' }]), /unsupported entry type/);
    await refused(raw([{ name: 'sp', data: 'x', pax: { 'GNU.sparse.major': '1', 'GNU.sparse.minor': '0' } }]), /sparse/);
  });

  it('refuses malformed PAX records', async () => {
    await refused(raw([{ name: 'f', data: 'x', paxRaw: Buffer.from('-5 path=a\n') }]), /corrupt.*PAX/);
    await refused(raw([{ name: 'f', data: 'x', paxRaw: Buffer.from('99 path=a\n') }]), /corrupt.*PAX/);
  });

  it('refuses device numbers out of range', async () => {
    await refused(raw([{ name: 'dev/x', typeflag: '3', devmajor: 4096, devminor: 0 }]), /layer entry "dev\/x": devmajor 4096 is beyond 4095, the largest major number Linux stores/);
  });

  it('refuses names with NUL bytes and uid (uid_t)-1', async () => {
    await refused(raw([{ name: 'f', data: 'x', pax: { path: 'a\u0000b' } }]), /NUL/);
    await refused(raw([{ name: 'f', data: 'x', pax: { uid: '4294967295' } }]), /layer entry "f": uid 4294967295 is beyond 4294967294, the largest owner Linux stores \(4294967295 is \(uid_t\)-1/);
  });

  it('refuses an xattr in a namespace Linux does not store as the layer\'s fault (InvalidArgument naming the entry), not Internal', async () => {
    await refused(raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.foo.bar': 'v' } }]), /layer entry "f": xattr "foo.bar": "foo." is not an xattr namespace Linux stores \(security., system., trusted., user.\)/);
    await refused(raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.nodot': 'v' } }]), /layer entry "f": xattr "nodot": no namespace is not an xattr namespace/);
    await refused(raw([{ name: 'f', data: 'x', pax: { 'SCHILY.xattr.user.': 'v' } }]), /layer entry "f": xattr "user.": nothing follows the namespace/);
  });

  it('never hangs when the input stalls after an error', async () => {
    const input = new PassThrough();
    input.write(await pk([{ name: '../x', data: 'x' }]));
    // the input never ends: applyLayer must still settle, and destroy it
    const err = await applyLayer(input, dest).catch((e: unknown) => e);
    expect((err as GearError).class).toBe('InvalidArgument');
    expect(input.destroyed).toBe(true);
  });
});
