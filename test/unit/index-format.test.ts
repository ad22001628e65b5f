/**
 * The Gear index format: tar codec, manifest validation, index layer round
 * trip and determinism, and hostile input (docs/format.md).
 */
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { isClass } from '../../src/core/errors.js';
import { readIndexLayer, writeIndexLayer } from '../../src/core/index/index-layer.js';
import {
  comparePaths,
  encodeIndexManifest,
  GearMediaType,
  parseIndexManifest,
  validateIndexManifest,
  type IndexManifest,
} from '../../src/core/index/manifest.js';
import { encodeTarHeader, readTar, tarPadding, tarTrailer, type TarHeader } from '../../src/core/index/tar.js';
import { encodeTreeEntry } from '../../src/core/index/tree.js';
import { indexTarHeader } from './fixtures/tarbuild.js';

const D = (c: string) => `sha256:${c.repeat(64).slice(0, 64)}`;
const sha = (b: Buffer | string) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/** A regular-file header unless `over` says otherwise. */
const hdr = (path: string, over: Partial<TarHeader> = {}): TarHeader => indexTarHeader(path, 'file', over);

async function* chunks(buf: Buffer, size = 333): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

async function collect(gen: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of gen) parts.push(c);
  return Buffer.concat(parts);
}

function tarOf(entries: { h: TarHeader; body?: Buffer }[], trailer = true): Buffer {
  const parts: Buffer[] = [];
  for (const { h, body } of entries) {
    parts.push(encodeTarHeader(h));
    if (body) parts.push(body, tarPadding(body.length));
  }
  if (trailer) parts.push(tarTrailer());
  return Buffer.concat(parts);
}

async function readAll(buf: Buffer): Promise<{ h: TarHeader; body: Buffer }[]> {
  const out: { h: TarHeader; body: Buffer }[] = [];
  for await (const e of readTar(chunks(buf))) out.push({ h: e.header, body: await collect(e.body() as AsyncIterable<Buffer>) });
  return out;
}

async function expectInvalid(p: Promise<unknown>, re: RegExp): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'expected a rejection').toBeInstanceOf(Error);
  expect(isClass(err, 'InvalidArgument'), String(err)).toBe(true);
  expect(String((err as Error).message)).toMatch(re);
}

describe('tar codec', () => {
  it('round-trips every entry type and the metadata PAX carries', async () => {
    const cap = Buffer.from([0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0xff, 0x80, 0x00]); // binary, not UTF-8
    const long = `${'d'.repeat(120)}/${'é'.repeat(80)}`;
    const entries = [
      { h: hdr('a/', { type: 'dir', mode: 0o1777 }) },
      { h: hdr('a/file', { size: 5, uid: 3_000_000, gid: 7, uname: 'someone-with-a-very-long-user-name-x', gname: 'g' }), body: Buffer.from('hello') },
      { h: hdr('a/cap', { size: 1, mode: 0o4755, xattrs: new Map([['security.capability', cap], ['user.x', Buffer.from('y')]]) }), body: Buffer.from('x') },
      { h: hdr('a/link', { type: 'link', linkname: 'a/file' }) },
      { h: hdr('a/sym', { type: 'symlink', linkname: `../${long}` }) },
      { h: hdr('dev/null', { type: 'char', mode: 0o666, devmajor: 1, devminor: 3 }) },
      { h: hdr('dev/sda', { type: 'block', devmajor: 8, devminor: 0 }) },
      { h: hdr('fifo', { type: 'fifo', mtime: -2, mtimeNsec: 500_000_000 }) },
      { h: hdr(long, { mtimeNsec: 123_456_789, size: 0 }) },
    ];
    const got = await readAll(tarOf(entries));
    expect(got.map((g) => g.h)).toEqual(entries.map((e) => ({ ...e.h, size: e.body?.length ?? 0 })));
    expect(got[1]!.body.toString()).toBe('hello');
    expect(got[2]!.h.xattrs.get('security.capability')).toEqual(cap);
  });

  it('encodes the same header to the same bytes', () => {
    const h = hdr('x/y', { xattrs: new Map([['b', Buffer.from('2')], ['a', Buffer.from('1')]]), mtimeNsec: 5 });
    const h2 = hdr('x/y', { xattrs: new Map([['a', Buffer.from('1')], ['b', Buffer.from('2')]]), mtimeNsec: 5 });
    expect(encodeTarHeader(h).equals(encodeTarHeader(h2))).toBe(true);
  });

  it('rejects a truncated body', async () => {
    const t = tarOf([{ h: hdr('f', { size: 1000 }), body: Buffer.alloc(1000, 1) }]);
    await expectInvalid(readAll(t.subarray(0, 900)), /truncated/);
  });

  it('rejects a truncated header', async () => {
    const t = tarOf([{ h: hdr('f', { size: 3 }), body: Buffer.from('abc') }]);
    await expectInvalid(readAll(t.subarray(0, 1024 + 100)), /truncated/);
  });

  it('rejects a header with a bad checksum', async () => {
    const t = tarOf([{ h: hdr('f') }]);
    t[0] = 'g'.charCodeAt(0);
    await expectInvalid(readAll(t), /checksum/);
  });

  it('rejects unknown entry types instead of guessing their body size', async () => {
    const t = tarOf([{ h: hdr('f') }]);
    t[156] = 'S'.charCodeAt(0); // GNU sparse
    let sum = 0;
    t.fill(0x20, 148, 156);
    for (let i = 0; i < 512; i++) sum += t[i]!;
    t.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
    await expectInvalid(readAll(t), /unsupported type/);
  });

  it('lets a PAX size override the header size, as Go does (no parser desync)', async () => {
    // A PAX header says 600 bytes, the ustar header says 0: the reader must
    // take 600 bytes of body and not parse them as headers (TARmageddon).
    const inner = tarOf([{ h: hdr('smuggled', { size: 1 }), body: Buffer.from('!') }], false).subarray(0, 600);
    const body = Buffer.concat([inner, Buffer.alloc(600 - inner.length)]);
    const pax = Buffer.from('12 size=600\n');
    const paxHeader = encodeTarHeader(hdr('././@PaxHeader', { size: pax.length }));
    paxHeader[156] = 'x'.charCodeAt(0);
    paxHeader.fill(0x20, 148, 156);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += paxHeader[i]!;
    paxHeader.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
    const t = Buffer.concat([paxHeader, pax, tarPadding(pax.length), encodeTarHeader(hdr('outer')), body, tarPadding(600), tarTrailer()]);
    const got = await readAll(t);
    expect(got.map((g) => g.h.path)).toEqual(['outer']);
    expect(got[0]!.body.length).toBe(600);
  });

  it('reads GNU long names', async () => {
    const name = 'n'.repeat(300);
    const body = Buffer.from(`${name}\0`);
    const l = encodeTarHeader(hdr('././@LongLink', { size: body.length }));
    l[156] = 'L'.charCodeAt(0);
    l.fill(0x20, 148, 156);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += l[i]!;
    l.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
    const t = Buffer.concat([l, body, tarPadding(body.length), encodeTarHeader(hdr('short')), tarTrailer()]);
    expect((await readAll(t)).map((g) => g.h.path)).toEqual([name]);
  });
});

describe('index manifest', () => {
  const good: IndexManifest = {
    version: 1,
    location: { registry: '127.0.0.1:5000', repository: 'gear/app' },
    files: [
      { path: 'a', digest: D('a'), size: 1 },
      { path: 'a/b', digest: D('b'), size: 2, blob: { mediaType: GearMediaType.FileGzip, digest: D('c'), size: 9 } },
      { path: 'a-c', digest: D('a'), size: 1 },
    ],
  };

  it('orders paths component by component', () => {
    const paths = ['a-c', 'a/b', 'a', 'a/b/c', 'B', 'a.b', 'é'];
    expect([...paths].sort(comparePaths)).toEqual(['B', 'a', 'a/b', 'a/b/c', 'a-c', 'a.b', 'é']);
  });

  it('orders like the UTF-8 bytes of the paths with "/" as NUL, whatever the characters', () => {
    const alphabet = ['/', '-', '.', 'a', 'b', 'é', '\u00ff', '\u4e2d', '\ue000', '\uffff', '😀', '\u{10ffff}'];
    const rnd = (n: number) => Array.from({ length: n }, () => alphabet[Math.floor(Math.random() * alphabet.length)]).join('');
    const bytes = (a: string, b: string) => Math.sign(Buffer.compare(Buffer.from(a.replaceAll('/', '\0')), Buffer.from(b.replaceAll('/', '\0'))));
    for (let i = 0; i < 5000; i++) {
      const a = rnd(1 + (i % 6));
      const b = i % 3 === 0 ? a + rnd(1) : i % 3 === 1 ? a.slice(0, -1) + rnd(1) : rnd(1 + (i % 5));
      expect(Math.sign(comparePaths(a, b)), `${JSON.stringify(a)} vs ${JSON.stringify(b)}`).toBe(bytes(a, b));
    }
  });

  it('round-trips through its canonical encoding', () => {
    const bytes = encodeIndexManifest(good);
    expect(parseIndexManifest(bytes)).toEqual(good);
    expect(encodeIndexManifest(parseIndexManifest(bytes)).equals(bytes)).toBe(true);
  });

  it('round-trips a prefetch list (paths of files, in their own order)', () => {
    const withPrefetch: IndexManifest = { ...good, prefetch: ['a-c', 'a'] };
    const bytes = encodeIndexManifest(withPrefetch);
    expect(bytes.toString()).toMatch(/"prefetch":\["a-c","a"\]}$/);
    expect(parseIndexManifest(bytes)).toEqual(withPrefetch);
    // An empty list is the same as none.
    expect(parseIndexManifest(encodeIndexManifest({ ...good, prefetch: [] }))).toEqual(good);
  });

  it('ignores unknown members (v1 may grow optional ones)', () => {
    const doc = JSON.parse(encodeIndexManifest(good).toString());
    doc.extra = { x: 1 };
    doc.files[0].note = 'x';
    expect(validateIndexManifest(doc)).toEqual(good);
  });

  const hostile: [string, (d: any) => void, RegExp][] = [
    ['not an object', (d) => Object.assign(d, { files: 'x' }), /files/],
    ['uppercase digest', (d) => (d.files[0].digest = D('A')), /digest/],
    ['short digest', (d) => (d.files[0].digest = 'sha256:abc'), /digest/],
    ['sha512 digest', (d) => (d.files[0].digest = `sha512:${'a'.repeat(128)}`), /digest/],
    ['digest with a path in it', (d) => (d.files[0].digest = 'sha256:../../../../etc/passwd'), /digest/],
    ['parent traversal', (d) => (d.files[0].path = '../etc/passwd'), /"\.\." component/],
    ['inner traversal', (d) => (d.files[2].path = 'a-c/../../x'), /"\.\." component/],
    ['absolute path', (d) => (d.files[0].path = '/etc/passwd'), /absolute/],
    ['dot component', (d) => (d.files[0].path = './a'), /"\." component/],
    ['empty component', (d) => (d.files[2].path = 'a-c//x'), /empty path component/],
    ['empty path', (d) => (d.files[0].path = ''), /empty path/],
    ['NUL in path', (d) => (d.files[0].path = 'a\0b'), /NUL/],
    ['very long path', (d) => (d.files[2].path = `z/${'x'.repeat(5000)}`), /longer than/],
    ['reserved dir', (d) => (d.files[2].path = '.gear/index.json'), /reserved/],
    ['unsorted', (d) => d.files.reverse(), /in strictly increasing path order/],
    ['duplicate', (d) => (d.files[1] = { ...d.files[0] }), /files\[1\]: path "a" is repeated/],
    ['size 0', (d) => (d.files[0].size = 0), /size/],
    ['negative size', (d) => (d.files[0].size = -1), /size/],
    ['fractional size', (d) => (d.files[0].size = 1.5), /size/],
    ['size as a string', (d) => (d.files[0].size = '1'), /size/],
    ['huge size', (d) => (d.files[0].size = 2 ** 60), /size/],
    ['blob with unknown mediaType', (d) => (d.files[1].blob.mediaType = 'application/octet-stream'), /mediaType/],
    ['blob with a bad digest', (d) => (d.files[1].blob.digest = 'sha256:xyz'), /files\[1\] "a\/b": blob\.digest must be sha256:<64 lowercase hex>, not "sha256:xyz"/],
    ['bad registry', (d) => (d.location.registry = 'evil.com/x?y'), /registry/],
    ['bad repository', (d) => (d.location.repository = '../x'), /repository/],
    ['missing version', (d) => delete d.version, /version/],
    ['prefetch not an array', (d) => (d.prefetch = 'a'), /prefetch/],
    ['prefetch of an unknown path', (d) => (d.prefetch = ['a', 'etc/shadow']), /prefetch\[1\] "etc\/shadow" is not a path of the index/],
    ['prefetch repeating a path', (d) => (d.prefetch = ['a', 'a']), /repeated/],
    ['prefetch of a non-string', (d) => (d.prefetch = [1]), /prefetch\[0\]/],
    ['prefetch longer than files', (d) => (d.prefetch = ['a', 'a/b', 'a-c', 'a']), /lists 4 paths, more than the 3 files/],
  ];
  for (const [name, mutate, re] of hostile) {
    it(`rejects a manifest with ${name}`, () => {
      const doc = JSON.parse(encodeIndexManifest(good).toString());
      mutate(doc);
      let err: unknown;
      try {
        validateIndexManifest(doc);
      } catch (e) {
        err = e;
      }
      expect(isClass(err, 'InvalidArgument'), String(err)).toBe(true);
      expect((err as Error).message).toMatch(re);
    });
  }

  // Version 2: the tree is in the manifest (docs/format.md §3.6).
  const goodV2 = {
    version: 2,
    location: { registry: '127.0.0.1:5000', repository: 'gear/app' },
    tree: [
      { path: 'bin', type: 'dir', mode: 0o755, mtime: 1700000000 },
      { path: 'bin/a', type: 'file', mode: 0o644, uid: 7, gid: 8, uname: 'u', gname: 'g', mtime: -1, mtimeNsec: 5, digest: D('a'), size: 1 },
      { path: 'bin/b', type: 'link', linkname: 'bin/a' },
      { path: 'bin/c', type: 'symlink', mode: 0o777, linkname: '../etc/x' },
      { path: 'dev', type: 'dir' },
      { path: 'dev/n', type: 'char', mode: 0o666, devmajor: 1, devminor: 3 },
      { path: 'etc', type: 'dir' },
      { path: 'etc/e', type: 'file' },
      {
        path: 'etc/x', type: 'file', mode: 0o4755, xattrs: { 'security.capability': 'AQAAAv8=', 'user.z': '' },
        digest: D('b'), size: 2, blob: { mediaType: GearMediaType.FileGzip, digest: D('c'), size: 9 },
      },
    ],
    prefetch: ['etc/x'],
  };

  it('version 2: round-trips through its canonical encoding, files taken from the tree', () => {
    const bytes = Buffer.from(JSON.stringify(goodV2));
    const m = parseIndexManifest(bytes);
    expect(m.files).toEqual([
      { path: 'bin/a', digest: D('a'), size: 1 },
      { path: 'etc/x', digest: D('b'), size: 2, blob: { mediaType: GearMediaType.FileGzip, digest: D('c'), size: 9 } },
    ]);
    expect(m.tree!.map((h) => `${h.path} ${h.type}`)).toEqual(goodV2.tree.map((e) => `${e.path} ${e.type}`));
    expect(m.tree![1]).toMatchObject({ uid: 7, gid: 8, uname: 'u', gname: 'g', mtime: -1, mtimeNsec: 5, size: 0 });
    expect(m.tree![5]).toMatchObject({ devmajor: 1, devminor: 3 });
    expect(m.tree![8]!.xattrs.get('security.capability')).toEqual(Buffer.from([1, 0, 0, 2, 0xff]));
    expect(encodeIndexManifest(m).equals(bytes)).toBe(true);
  });

  const hostileV2: [string, (d: any) => void, RegExp][] = [
    ['a "files" member', (d) => (d.files = []), /no "files" member/],
    ['no tree', (d) => delete d.tree, /version 2 needs "tree" as an array/],
    ['an entry that is not an object', (d) => (d.tree[0] = 'bin'), /tree\[0\]: not an object/],
    ['an unknown type', (d) => (d.tree[7].type = 'socket'), /"type" must be one of/],
    ['a mode with type bits', (d) => (d.tree[7].mode = 0o100644), /"mode"/],
    ['a negative uid', (d) => (d.tree[7].uid = -1), /"uid"/],
    ['a 33-bit gid', (d) => (d.tree[7].gid = 2 ** 32), /"gid"/],
    ['a fractional mtime', (d) => (d.tree[7].mtime = 1.5), /"mtime"/],
    ['nanoseconds of a second or more', (d) => (d.tree[7].mtimeNsec = 1e9), /"mtimeNsec"/],
    ['a uname with NUL', (d) => (d.tree[7].uname = 'a\0b'), /"uname"/],
    ['a linkname on a directory', (d) => (d.tree[0].linkname = 'x'), /"linkname" is required for hard links and symlinks, and only/],
    ['a symlink without a target', (d) => delete d.tree[3].linkname, /"linkname"/],
    ['device numbers on a file', (d) => (d.tree[7].devmajor = 1), /tree\[7\] "etc\/e": "devmajor"\/"devminor" are for char and block devices only/],
    ['an xattr value that is not base64', (d) => (d.tree[8].xattrs['user.z'] = '!!!'), /canonical base64/],
    ['an xattr value in unpadded base64', (d) => (d.tree[8].xattrs['security.capability'] = 'AQAAAv8'), /canonical base64/],
    ['an xattr value over 64 KiB', (d) => (d.tree[8].xattrs['user.z'] = Buffer.alloc(65537).toString('base64')), /at most 65536/],
    ['an empty xattr name', (d) => (d.tree[8].xattrs[''] = ''), /tree\[8\] "etc\/x": xattr name "" must be 1-255 bytes/],
    ['a digest on a directory', (d) => (d.tree[6].digest = D('a')), /tree\[6\] "etc": only a regular file has a "digest"/],
    ['a size without a digest', (d) => delete d.tree[1].digest, /tree\[1\] "bin\/a": "digest" must be sha256/],
    ['a traversing path', (d) => (d.tree[7].path = 'etc/../../e'), /"\.\." component/],
    ['a path under .gear/', (d) => d.tree.unshift({ path: '.gear/x', type: 'file' }), /reserved/],
    ['entries out of order', (d) => d.tree.reverse(), /in strictly increasing path order/],
    ['a repeated path', (d) => (d.tree[7].path = 'etc'), /tree\[7\]: path "etc" is repeated/],
    ['a hard link to a later entry', (d) => (d.tree[2].linkname = 'etc/x'), /tree\[2\] "bin\/b": hard link to "etc\/x", which is not an earlier/],
    ['a hard link to a directory', (d) => (d.tree[2].linkname = 'bin'), /hard link to "bin", which is not an earlier non-directory entry/],
    ['a prefetch path that is not a file with content', (d) => (d.prefetch = ['etc/e']), /prefetch\[0\] "etc\/e" is a regular file without content/],
  ];
  for (const [name, mutate, re] of hostileV2) {
    it(`version 2: rejects a manifest with ${name}`, () => {
      const doc = structuredClone(goodV2) as any;
      mutate(doc);
      let err: unknown;
      try {
        parseIndexManifest(Buffer.from(JSON.stringify(doc)));
      } catch (e) {
        err = e;
      }
      expect(isClass(err, 'InvalidArgument'), String(err)).toBe(true);
      expect((err as Error).message).toMatch(re);
    });
  }

  it('rejects a newer format version as FailedPrecondition', () => {
    let err: unknown;
    try {
      parseIndexManifest(Buffer.from('{"version":4,"files":[]}'));
    } catch (e) {
      err = e;
    }
    expect(isClass(err, 'FailedPrecondition')).toBe(true);
    expect((err as Error).message).toMatch(/unsupported format version 4 .*upgrade gear/);
  });

  it('rejects bytes that are not UTF-8 JSON', () => {
    expect(() => parseIndexManifest(Buffer.from([0x7b, 0xff, 0x7d]))).toThrow(/UTF-8 JSON/);
    expect(() => parseIndexManifest(Buffer.from('[1,2]'))).toThrow(/must be a JSON object/);
  });
});

/** A manifest's JSON built by hand (the reader must refuse what the writer would not write). */
function rawManifestJson(m: IndexManifest, e: TarHeader[]): Buffer {
  if (m.version === 1) return encodeIndexManifest(m);
  const byPath = new Map(m.files.map((f) => [f.path, f]));
  const tree = e.map((h) => {
    const f = h.type === 'file' ? byPath.get(h.path) : undefined;
    if (f) byPath.delete(h.path);
    return encodeTreeEntry(h, f);
  });
  if (byPath.size) throw new Error('version 2 cannot express a file that is not a regular file of the tree');
  return Buffer.from(JSON.stringify({ version: m.version, tree }));
}

describe.each([1, 2])('index layer, format version %i', (version) => {
  const manifest: IndexManifest = {
    version,
    files: [
      { path: 'bin/busybox', digest: sha('busybox'), size: 7 },
      { path: 'etc/cap', digest: sha('cap'), size: 3, blob: { mediaType: GearMediaType.FileGzip, digest: sha('capgz'), size: 20 } },
    ],
  };
  const entries = (): TarHeader[] => [
    hdr('bin', { type: 'dir', mode: 0o755 }),
    hdr('bin/busybox', { mode: 0o755, uid: 1000, gid: 4294967295, uname: 'u', gname: 'g', mtime: -5, mtimeNsec: 1 }),
    hdr('bin/ls', { type: 'symlink', linkname: 'busybox' }),
    hdr('bin/ls2', { type: 'link', linkname: 'bin/ls' }), // a hard link to a symlink
    hdr('bin/sh', { type: 'link', linkname: 'bin/busybox' }),
    hdr('dev', { type: 'dir' }),
    hdr('dev/null', { type: 'char', devmajor: 1, devminor: 3 }),
    hdr('etc', { type: 'dir' }),
    hdr('etc/cap', { xattrs: new Map([['security.capability', Buffer.from([1, 0, 0, 2, 0xff])], ['user.a', Buffer.alloc(0)]]) }),
    hdr('etc/empty'),
    hdr('etc/fifo', { type: 'fifo' }),
  ];
  const plain = (h: TarHeader) => ({ ...h, path: h.path.replace(/\/$/, '') });

  it('round-trips: manifest first, entries unchanged', async () => {
    const bytes = await collect(writeIndexLayer(manifest, entries()));
    const raw = await readAll(bytes);
    expect(raw[0]!.h.path).toBe('.gear/index.json');
    if (version === 1) expect(raw[1]!.h.path).toBe('bin/'); // directories with a trailing slash
    else expect(raw).toHaveLength(1); // the tree is in the manifest: one tar entry
    const layer = await readIndexLayer(chunks(bytes, 100));
    const { tree, ...rest } = layer.manifest;
    expect(rest).toEqual(manifest);
    if (version === 1) expect(tree).toBeUndefined();
    else expect(tree!.map(plain)).toEqual(entries());
    expect(layer.entries.map(plain)).toEqual(entries());
  });

  it('is deterministic: equal input gives equal bytes', async () => {
    const a = await collect(writeIndexLayer(manifest, entries()));
    const b = await collect(writeIndexLayer(structuredClone(manifest), entries()));
    expect(sha(a)).toBe(sha(b));
  });

  const bad: [string, () => [IndexManifest, TarHeader[]], RegExp][] = [
    ['a listed file missing from the tar', () => [manifest, entries().filter((e) => e.path !== 'etc/cap')], /lists "etc\/cap", but the tar has no regular file|lists "etc\/cap" but the tree has no such/],
    ['a listed path that is a hard link', () => [{ version, files: [{ path: 'bin/sh', digest: D('a'), size: 1 }] }, entries()], /entry "bin\/sh": listed in the manifest with content, but a link|tree\[\d+\] "bin\/sh": only a regular file/],
    ['a listed path that is a symlink', () => [{ version, files: [{ path: 'bin/ls', digest: D('a'), size: 1 }] }, entries()], /entry "bin\/ls": listed in the manifest with content, but a symlink|tree\[\d+\] "bin\/ls": only a regular file/],
    ['entries out of order', () => [manifest, entries().reverse()], /in strictly increasing path order/],
    ['an entry with ".."', () => [manifest, [...entries(), hdr('z/../../x')]], /"\.\." component/],
    ['an entry under .gear/', () => [manifest, [hdr('.gear/evil'), ...entries()]], /reserved/],
    ['a hard link to a later or missing file', () => [manifest, [...entries(), hdr('z', { type: 'link', linkname: 'nope' })]], /hard link/],
  ];
  for (const [name, make, re] of bad) {
    it(`refuses to write or read a layer with ${name}`, async () => {
      const [m, e] = make();
      await expectInvalid(collect(writeIndexLayer(m, e)), re);
      // Build the same layer by hand and check the reader refuses it too.
      let json: Buffer;
      try {
        json = rawManifestJson(m, e);
      } catch {
        return; // version 2 cannot even express it: a file's content lives on its tree entry
      }
      const t = tarOf([{ h: hdr('.gear/index.json', { size: json.length, mode: 0o444, mtime: 0 }), body: json }, ...(version === 1 ? e.map((h) => ({ h })) : [])]);
      await expectInvalid(readIndexLayer(chunks(t)), re);
    });
  }
});

describe('index layer', () => {
  const manifest: IndexManifest = { version: 1, files: [{ path: 'bin/busybox', digest: sha('busybox'), size: 7 }] };
  const entries = (): TarHeader[] => [hdr('bin', { type: 'dir', mode: 0o755 }), hdr('bin/busybox', { mode: 0o755 })];

  it('version 2: refuses a tar entry after the manifest', async () => {
    const json = rawManifestJson({ ...manifest, version: 2 }, entries());
    const t = tarOf([{ h: hdr('.gear/index.json', { size: json.length, mode: 0o444 }), body: json }, { h: hdr('zzz') }]);
    await expectInvalid(readIndexLayer(chunks(t)), /holds only \.gear\/index\.json, but an entry "zzz" follows/);
  });

  it('version 2: a 5,000-path tree is one small tar entry', async () => {
    const m: IndexManifest = { version: 2, files: [] };
    const e: TarHeader[] = [hdr('d', { type: 'dir', mode: 0o755 })];
    for (let i = 0; i < 5000; i++) {
      const p = `d/f${String(i).padStart(5, '0')}`;
      e.push(hdr(p, { mode: 0o644, mtime: 1700000000 }));
      m.files.push({ path: p, digest: sha(p), size: 100 + i });
    }
    const v2 = await collect(writeIndexLayer(m, e));
    const v1 = await collect(writeIndexLayer({ ...m, version: 1 }, e));
    expect((await readAll(v2)).length).toBe(1);
    expect((await readAll(v1)).length).toBe(5002);
    expect(v2.length).toBeLessThan(v1.length / 2);
    const back = await readIndexLayer(chunks(v2, 4096));
    expect(back.manifest.files).toEqual(m.files);
    expect(back.entries.map((h) => h.path)).toEqual(e.map((h) => h.path));
  });
  it('refuses a layer whose first entry is not the manifest', async () => {
    const t = tarOf([{ h: hdr('bin', { type: 'dir' }) }]);
    await expectInvalid(readIndexLayer(chunks(t)), /first entry/);
  });

  it('refuses a regular file with a body', async () => {
    const json = encodeIndexManifest({ version: 1, files: [] });
    const t = tarOf([{ h: hdr('.gear/index.json', { size: json.length }), body: json }, { h: hdr('x', { size: 2 }), body: Buffer.from('hi') }]);
    await expectInvalid(readIndexLayer(chunks(t)), /entry "x": a regular file of \d+ bytes; in an index layer regular files are empty/);
  });

  it('refuses a hostile manifest inside a layer', async () => {
    const json = Buffer.from(JSON.stringify({ version: 1, files: [{ path: '../../etc/shadow', digest: D('a'), size: 1 }] }));
    const t = tarOf([{ h: hdr('.gear/index.json', { size: json.length }), body: json }]);
    await expectInvalid(readIndexLayer(chunks(t)), /"\.\." component/);
  });

  it('refuses a truncated index layer', async () => {
    const bytes = await collect(writeIndexLayer(manifest, entries()));
    await expectInvalid(readIndexLayer(chunks(bytes.subarray(0, 700))), /truncated/);
  });
});
