/**
 * A deterministic corpus of hostile index manifests and index-layer tars
 * (docs/format.md §3), each run through the real path of a pull: the tar
 * reader and manifest parser (readIndexLayer), the tree builder
 * (indexTreeFromEntries) and the EROFS image builder. Every case is either
 * refused with InvalidArgument (FailedPrecondition for an unknown format
 * version) and a message that names the entry and the rule, or accepted with
 * the output the spec prescribes (checked on the built tree).
 *
 * Cases are counted by the table: `CASES.length` (see the last test).
 * Property-based fuzzing of the same parsers lives elsewhere.
 */
import { gzipSync } from 'node:zlib';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { GearError } from '../../src/core/errors.js';
import { manifestHeader, readIndexLayer } from '../../src/core/index/index-layer.js';
import { encodeTarHeader, tarPadding, tarTrailer, type TarHeader } from '../../src/core/index/tar.js';
import { layerBytes } from '../../src/core/archive/tarreader.js';
import { buildErofsImage, type ErofsNode } from '../../src/core/layers/erofs-image.js';
import { indexTreeFromEntries } from '../../src/core/layers/index-image.js';
import { headerBlock, indexTarHeader } from './fixtures/tarbuild.js';

const D = (c: string) => `sha256:${c.repeat(64).slice(0, 64)}`;
const A = D('a');
const B = D('b');

/** Bytes of one tar entry with a body. */
const entry = (h: TarHeader, body?: Buffer): Buffer => Buffer.concat([encodeTarHeader({ ...h, size: body?.length ?? 0 }), ...(body ? [body, tarPadding(body.length)] : [])]);
const manifestEntry = (json: string | Buffer): Buffer => entry(manifestHeader(0), Buffer.isBuffer(json) ? json : Buffer.from(json));
/** A version 2 layer: the manifest document (object or raw JSON text) as its only entry. */
const v2 = (doc: unknown): Buffer => Buffer.concat([manifestEntry(typeof doc === 'string' ? doc : JSON.stringify(doc)), tarTrailer()]);
/** A version 2 document with this tree. */
const tree = (entries: unknown[], extra: Record<string, unknown> = {}): unknown => ({ version: 2, tree: entries, ...extra });
/** A version 3 layer: this tree over one pack of 100 bytes. */
const v3 = (entries: unknown[]): Buffer => v2({ version: 3, packs: [{ digest: D('c'), size: 100 }], tree: entries });
/** A version 1 layer: manifest `files`, then tar entries. */
const v1 = (files: unknown[], entries: Buffer[], extra: Record<string, unknown> = {}): Buffer =>
  Buffer.concat([manifestEntry(JSON.stringify({ version: 1, files, ...extra })), ...entries, tarTrailer()]);
const h = (path: string, type: TarHeader['type'], over: Partial<TarHeader> = {}): TarHeader => indexTarHeader(path, type, over);
const f = (path: string, extra: Record<string, unknown> = {}) => ({ path, type: 'file', ...extra });
const dir = (path: string, extra: Record<string, unknown> = {}) => ({ path, type: 'dir', mode: 0o755, ...extra });
const withContent = (path: string, digest = A, size = 5, extra: Record<string, unknown> = {}) => f(path, { digest, size, ...extra });

interface Built {
  root: ErofsNode;
  image: Buffer;
  files: number;
}

/** The node at a path of the built tree. */
function at(root: ErofsNode, p: string): ErofsNode | undefined {
  let n: ErofsNode | undefined = root;
  for (const c of p.split('/')) n = n?.children?.get(c);
  return n;
}

async function* chunksOf(buf: Buffer, size = 4096): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

/** What a pull does with an index layer: read and validate, build the tree, build the EROFS image. */
async function pull(tar: Buffer | AsyncIterable<Buffer>): Promise<Built> {
  const layer = await readIndexLayer(Buffer.isBuffer(tar) ? chunksOf(tar) : tar);
  const { root, result } = indexTreeFromEntries(layer.manifest, layer.entries);
  return { root, image: buildErofsImage(root), files: result.files };
}

type Case =
  | { name: string; tar: () => Buffer | AsyncIterable<Buffer>; refused: RegExp; class?: 'InvalidArgument' | 'FailedPrecondition' }
  | { name: string; tar: () => Buffer | AsyncIterable<Buffer>; accepted: (b: Built) => void };

const deep = Array.from({ length: 2000 }, () => 'a').join('/'); // 3,999 bytes, 2,000 levels
const deepDirs = (n: number) => Array.from({ length: n }, (_, i) => dir(Array.from({ length: i + 1 }, () => 'a').join('/')));

const CASES: Case[] = [
  // ---- paths
  { name: 'a path with ".." escaping the root', tar: () => v2(tree([withContent('../etc/passwd')])), refused: /tree\[0\]: path "\.\.\/etc\/passwd": "\.\." component/ },
  { name: 'a path with ".." inside', tar: () => v2(tree([dir('a'), f('a/../b')])), refused: /tree\[1\]: path "a\/\.\.\/b": "\.\." component/ },
  { name: 'an absolute path', tar: () => v2(tree([f('/etc/shadow')])), refused: /tree\[0\]: path "\/etc\/shadow": absolute path/ },
  { name: 'a "." component', tar: () => v2(tree([dir('a'), f('a/./b')])), refused: /tree\[1\]: path "a\/\.\/b": "\." component/ },
  { name: 'an empty component', tar: () => v2(tree([dir('a'), f('a//b')])), refused: /tree\[1\]: path "a\/\/b": empty path component/ },
  { name: 'a trailing slash', tar: () => v2(tree([dir('a/')])), refused: /tree\[0\]: path "a\/": empty path component/ },
  { name: 'an empty path', tar: () => v2(tree([f('')])), refused: /tree\[0\]: path "": empty path/ },
  { name: 'a NUL byte in a path', tar: () => v2(tree([f('a\u0000b')])), refused: /tree\[0\]: path "a\\u0000b": contains a NUL byte/ },
  { name: 'a path over 4096 bytes', tar: () => v2(tree([f('x'.repeat(200) + '/y'.repeat(2000))])), refused: /tree\[0\]: path "x{200}": longer than 4096 bytes/ },
  { name: 'a component over 255 bytes (NAME_MAX)', tar: () => v2(tree([f('n'.repeat(256))])), refused: /tree\[0\]: path "n+": a component longer than 255 bytes \(NAME_MAX\)/ },
  { name: 'a path under the reserved .gear/', tar: () => v2(tree([dir('.gear'), f('.gear/index.json')])), refused: /tree\[0\]: path "\.gear" is under the reserved \.gear\// },
  { name: 'duplicate paths', tar: () => v2(tree([f('a'), f('a')])), refused: /tree\[1\]: path "a" is repeated/ },
  { name: 'paths out of order', tar: () => v2(tree([f('b'), f('a')])), refused: /tree\[1\]: path "a" comes after "b" in the list but sorts before it/ },
  { name: 'a path repeated through JSON duplicate keys (the last one wins, and is checked)', tar: () => v2('{"version":2,"tree":[{"path":"ok","path":"../x","type":"file"}]}'), refused: /tree\[0\]: path "\.\.\/x": "\.\." component/ },
  { name: 'a whiteout in an index', tar: () => v2(tree([f('.wh.etc')])), refused: /entry "\.wh\.etc": whiteouts have no place in an index layer/ },
  {
    name: 'a file under a symlink (the symlink is never followed)',
    tar: () => v2(tree([{ path: 'a', type: 'symlink', linkname: '/etc' }, withContent('a/passwd')])),
    refused: /entry "a\/passwd": parent "a" is not a directory/,
  },
  { name: 'a file under a regular file', tar: () => v2(tree([f('a'), f('a/b')])), refused: /entry "a\/b": parent "a" is not a directory/ },
  {
    name: 'deep nesting up to the path bound (2,000 levels, 3,999 bytes) is accepted',
    tar: () => v2(tree([...deepDirs(1999), withContent(deep)])),
    accepted: (b) => expect(at(b.root, deep)).toMatchObject({ type: 'file', size: 5 }),
  },
  { name: 'deep nesting beyond the path bound (2,049 levels)', tar: () => v2(tree([f(Array.from({ length: 2049 }, () => 'a').join('/'))])), refused: /tree\[0\]: path "a\/a\/a.*": longer than 4096 bytes/ },
  { name: 'missing parents are made 0755 (as Docker does)', tar: () => v2(tree([withContent('x/y/z')])), accepted: (b) => expect(at(b.root, 'x/y')).toMatchObject({ type: 'dir', mode: 0o755 }) },

  // ---- hard links
  { name: 'a hard link to a missing entry', tar: () => v2(tree([{ path: 'l', type: 'link', linkname: 'nothing' }])), refused: /tree\[0\] "l": hard link to "nothing", which is not an earlier non-directory entry/ },
  { name: 'a hard link to a later entry', tar: () => v2(tree([{ path: 'a', type: 'link', linkname: 'b' }, withContent('b')])), refused: /tree\[0\] "a": hard link to "b", which is not an earlier/ },
  { name: 'a hard link outside the root (absolute)', tar: () => v2(tree([{ path: 'l', type: 'link', linkname: '/etc/shadow' }])), refused: /tree\[0\] "l": hard link to "\/etc\/shadow", which is not an earlier/ },
  { name: 'a hard link outside the root (..)', tar: () => v2(tree([withContent('a'), { path: 'l', type: 'link', linkname: '../a' }])), refused: /tree\[1\] "l": hard link to "\.\.\/a", which is not an earlier/ },
  { name: 'a hard link to a directory', tar: () => v2(tree([dir('d'), { path: 'l', type: 'link', linkname: 'd' }])), refused: /tree\[1\] "l": hard link to "d", which is not an earlier non-directory entry/ },
  { name: 'a hard link to itself', tar: () => v2(tree([{ path: 'l', type: 'link', linkname: 'l' }])), refused: /tree\[0\] "l": hard link to "l", which is not an earlier/ },
  { name: 'a hard link without a target', tar: () => v2(tree([{ path: 'l', type: 'link' }])), refused: /tree\[0\] "l": "linkname" is required for hard links and symlinks, and only for them \(this is a link\)/ },
  { name: 'a hard link carrying a digest', tar: () => v2(tree([withContent('a'), { path: 'l', type: 'link', linkname: 'a', digest: A, size: 5 }])), refused: /tree\[1\] "l": only a regular file has a "digest", "size", "blob", "pack" or "chunks" \(this is a link\)/ },
  {
    name: 'a hard link to an earlier file shares its inode and content',
    tar: () => v2(tree([withContent('a', A, 7), { path: 'l', type: 'link', linkname: 'a' }])),
    accepted: (b) => {
      expect(at(b.root, 'l')).toBe(at(b.root, 'a'));
      expect(at(b.root, 'l')!.size).toBe(7);
    },
  },

  // ---- digests and sizes
  { name: 'a digest in uppercase hex', tar: () => v2(tree([withContent('a', `sha256:${'A'.repeat(64)}`)])), refused: /tree\[0\] "a": "digest" must be sha256:<64 lowercase hex>, not "sha256:A{64}"/ },
  { name: 'a short digest', tar: () => v2(tree([withContent('a', 'sha256:abc')])), refused: /tree\[0\] "a": "digest" must be sha256:<64 lowercase hex>, not "sha256:abc"/ },
  { name: 'a digest of another algorithm', tar: () => v2(tree([withContent('a', `sha512:${'a'.repeat(128)}`)])), refused: /tree\[0\] "a": "digest" must be sha256/ },
  { name: 'a digest with a path in it', tar: () => v2(tree([withContent('a', `sha256:../../${'a'.repeat(58)}`)])), refused: /tree\[0\] "a": "digest" must be sha256:<64 lowercase hex>/ },
  { name: 'a digest that is not a string', tar: () => v2(tree([withContent('a', 42 as unknown as string)])), refused: /tree\[0\] "a": "digest" must be sha256:<64 lowercase hex>, not 42/ },
  { name: 'a size of -1', tar: () => v2(tree([withContent('a', A, -1)])), refused: /tree\[0\] "a": "size" must be a whole number in 1…2\^53−1, not -1/ },
  { name: 'a size of 0 with a digest', tar: () => v2(tree([withContent('a', A, 0)])), refused: /tree\[0\] "a": "size" must be a whole number in 1…2\^53−1, not 0/ },
  { name: 'a fractional size', tar: () => v2(tree([withContent('a', A, 1.5)])), refused: /tree\[0\] "a": "size" must be a whole number in 1…2\^53−1, not 1\.5/ },
  { name: 'a size of 2^53 (beyond the safe integers)', tar: () => v2('{"version":2,"tree":[{"path":"a","type":"file","digest":"' + A + '","size":9007199254740993}]}'), refused: /tree\[0\] "a": "size" must be a whole number in 1…2\^53−1, not 9007199254740992/ },
  { name: 'a huge size (1e300)', tar: () => v2(tree([withContent('a', A, 1e300)])), refused: /tree\[0\] "a": "size" must be a whole number in 1…2\^53−1, not 1e\+300/ },
  { name: 'a size given as a string', tar: () => v2(tree([withContent('a', A, '5' as unknown as number)])), refused: /tree\[0\] "a": "size" must be a whole number in 1…2\^53−1, not "5"/ },
  { name: 'a size without a digest', tar: () => v2(tree([f('a', { size: 5 })])), refused: /tree\[0\] "a": "digest" must be sha256/ },
  { name: 'one digest with two sizes', tar: () => v2(tree([withContent('a', A, 5), withContent('b', A, 6000)])), refused: /file "b": sha256:a{64} is 6000 bytes here but 5 bytes at "a" \(one content has one size\)/ },
  {
    name: 'a size of 8 TiB is accepted (a sparse metacopy inode)',
    tar: () => v2(tree([withContent('big', A, 2 ** 43)])),
    accepted: (b) => expect(at(b.root, 'big')!.size).toBe(2 ** 43),
  },
  { name: 'a size beyond what an EROFS index stores (8 TiB)', tar: () => v2(tree([withContent('big', A, 2 ** 43 + 1)])), refused: /entry "big": a file of 8796093022209 bytes is beyond 8796093022208 \(8 TiB\), the largest an EROFS index stores/ },
  { name: 'a digest on a directory', tar: () => v2(tree([dir('d', { digest: A, size: 1 })])), refused: /tree\[0\] "d": only a regular file has a "digest", "size", "blob", "pack" or "chunks" \(this is a dir\)/ },
  { name: 'a blob of an unknown media type', tar: () => v2(tree([withContent('a', A, 5, { blob: { mediaType: 'application/x-evil', digest: B, size: 3 } })])), refused: /tree\[0\] "a": blob\.mediaType must be application\/vnd\.gear\.file\.v1\+gzip, not "application\/x-evil"/ },
  { name: 'a blob of size 0', tar: () => v2(tree([withContent('a', A, 5, { blob: { mediaType: 'application/vnd.gear.file.v1+gzip', digest: B, size: 0 } })])), refused: /tree\[0\] "a": blob\.size must be a whole number in 1…2\^53−1, not 0/ },
  { name: 'a blob digest malformed', tar: () => v2(tree([withContent('a', A, 5, { blob: { mediaType: 'application/vnd.gear.file.v1+gzip', digest: 'md5:x', size: 3 } })])), refused: /tree\[0\] "a": blob\.digest must be sha256:<64 lowercase hex>, not "md5:x"/ },

  // ---- metadata
  { name: 'uid 4294967295 ((uid_t)-1, which Linux cannot store)', tar: () => v2(tree([f('a', { uid: 4294967295 })])), refused: /entry "a": uid 4294967295 is beyond 4294967294, the largest owner Linux stores/ },
  {
    name: 'uid and gid 4294967294 are accepted and kept',
    tar: () => v2(tree([f('a', { uid: 4294967294, gid: 4294967294 })])),
    accepted: (b) => expect(at(b.root, 'a')).toMatchObject({ uid: 4294967294, gid: 4294967294 }),
  },
  { name: 'a uid beyond 32 bits', tar: () => v2(tree([f('a', { uid: 2 ** 32 })])), refused: /tree\[0\] "a": "uid" must be a whole number in 0…4294967295, not 4294967296/ },
  { name: 'a negative gid', tar: () => v2(tree([f('a', { gid: -1 })])), refused: /tree\[0\] "a": "gid" must be a whole number in 0…4294967295, not -1/ },
  { name: 'mode with file-type bits', tar: () => v2(tree([f('a', { mode: 0o100644 })])), refused: /tree\[0\] "a": "mode" must be a whole number in 0…4095, not 33188/ },
  { name: 'mtimeNsec of a whole second', tar: () => v2(tree([f('a', { mtimeNsec: 1e9 })])), refused: /tree\[0\] "a": "mtimeNsec" must be a whole number in 0…999999999, not 1000000000/ },
  { name: 'a negative mtime becomes the epoch (Docker\'s boundTime)', tar: () => v2(tree([f('a', { mtime: -5 })])), accepted: (b) => expect(at(b.root, 'a')).toMatchObject({ mtimeSec: 0, mtimeNsec: 0 }) },
  { name: 'an unknown entry type', tar: () => v2(tree([{ path: 's', type: 'socket' }])), refused: /tree\[0\] "s": "type" must be one of file, link, symlink, char, block, dir, fifo, not "socket"/ },
  { name: 'device numbers on a regular file', tar: () => v2(tree([f('a', { devmajor: 1 })])), refused: /tree\[0\] "a": "devmajor"\/"devminor" are for char and block devices only \(this is a file\)/ },
  { name: 'devmajor 4096 (beyond dev_t\'s 12 bits)', tar: () => v2(tree([{ path: 'c', type: 'char', devmajor: 4096 }])), refused: /entry "c": devmajor 4096 is beyond 4095, the largest major number Linux stores \(12 bits\)/ },
  { name: 'devminor 2^32−1 (allowed by the format, beyond dev_t\'s 20 bits)', tar: () => v2(tree([{ path: 'c', type: 'block', devminor: 4294967295 }])), refused: /entry "c": devminor 4294967295 is beyond 1048575, the largest minor number Linux stores \(20 bits\)/ },
  {
    name: 'devmajor 4095 and devminor 1048575 are accepted and kept',
    tar: () => v2(tree([{ path: 'c', type: 'char', devmajor: 4095, devminor: 1048575 }])),
    accepted: (b) => expect(at(b.root, 'c')).toMatchObject({ type: 'char', major: 4095, minor: 1048575 }),
  },
  { name: 'a symlink without a target', tar: () => v2(tree([{ path: 's', type: 'symlink' }])), refused: /tree\[0\] "s": "linkname" is required for hard links and symlinks/ },
  { name: 'a symlink target of 4096 bytes', tar: () => v2(tree([{ path: 's', type: 'symlink', linkname: 'x'.repeat(4096) }])), refused: /entry "s": a symlink target of 4096 bytes is beyond 4095, the longest Linux stores/ },
  { name: 'a symlink target over the format bound', tar: () => v2(tree([{ path: 's', type: 'symlink', linkname: 'x'.repeat(5000) }])), refused: /tree\[0\] "s": "linkname" is 5000 bytes, beyond the 4096 allowed/ },
  {
    name: 'a symlink pointing outside the root is kept verbatim (never resolved)',
    tar: () => v2(tree([{ path: 's', type: 'symlink', linkname: '../../../etc/shadow' }])),
    accepted: (b) => expect(at(b.root, 's')).toMatchObject({ type: 'symlink', target: '../../../etc/shadow' }),
  },
  { name: 'a uname with a NUL byte', tar: () => v2(tree([f('a', { uname: 'ro\u0000ot' })])), refused: /tree\[0\] "a": "uname" contains a NUL byte/ },

  // ---- xattrs
  {
    name: 'trusted.overlay.* xattrs from the index are stripped; a Gear file gets only its own',
    tar: () =>
      v2(
        tree([
          withContent('a', A, 5, { xattrs: { 'trusted.overlay.redirect': Buffer.from('/etc/shadow').toString('base64'), 'trusted.overlay.metacopy': '' } }),
          f('e', { xattrs: { 'trusted.overlay.opaque': Buffer.from('y').toString('base64'), 'user.overlay.redirect': Buffer.from('/x').toString('base64'), 'user.keep': 'AQ==' } }),
        ]),
      ),
    accepted: (b) => {
      const a = at(b.root, 'a')!;
      expect(a.xattrs.map(([n]) => n)).toEqual(['trusted.overlay.metacopy', 'trusted.overlay.redirect']);
      expect(a.xattrs[1]![1].toString()).toBe(`/sha256/aa/${'a'.repeat(64)}`);
      expect(at(b.root, 'e')!.xattrs).toEqual([['user.keep', Buffer.from([1])]]);
    },
  },
  { name: 'an xattr in an unknown namespace (InvalidArgument, not Internal)', tar: () => v2(tree([f('a', { xattrs: { 'foo.bar': 'AQ==' } })])), refused: /entry "a": xattr "foo\.bar": "foo\." is not an xattr namespace Linux stores/ },
  { name: 'an xattr named __proto__', tar: () => v2('{"version":2,"tree":[{"path":"a","type":"file","xattrs":{"__proto__":"AQ=="}}]}'), refused: /entry "a": xattr "__proto__": no namespace is not an xattr namespace Linux stores/ },
  { name: 'a system.* xattr other than the POSIX ACLs', tar: () => v2(tree([f('a', { xattrs: { 'system.nfs4_acl': 'AQ==' } })])), refused: /entry "a": xattr "system\.nfs4_acl": of system\.\*, only system\.posix_acl_access and system\.posix_acl_default are stored/ },
  { name: 'an xattr with nothing after its namespace', tar: () => v2(tree([f('a', { xattrs: { 'user.': 'AQ==' } })])), refused: /entry "a": xattr "user\.": nothing follows the namespace/ },
  { name: 'an empty xattr name', tar: () => v2(tree([f('a', { xattrs: { '': 'AQ==' } })])), refused: /tree\[0\] "a": xattr name "" must be 1-255 bytes without NUL/ },
  { name: 'an xattr value that is not canonical base64', tar: () => v2(tree([f('a', { xattrs: { 'user.x': 'AQ' } })])), refused: /tree\[0\] "a": xattr "user\.x": the value must be canonical base64 of at most 65536 bytes/ },
  { name: 'a huge xattr value (65537 bytes)', tar: () => v2(tree([f('a', { xattrs: { 'user.x': Buffer.alloc(65537).toString('base64') } })])), refused: /tree\[0\] "a": xattr "user\.x": the value must be canonical base64 of at most 65536 bytes/ },
  { name: 'an xattr value of 65536 bytes (Linux\'s limit, one more than EROFS stores)', tar: () => v2(tree([f('a', { xattrs: { 'user.x': Buffer.alloc(65536).toString('base64') } })])), refused: /entry "a": xattr "user\.x": a value of 65536 bytes is beyond 65535, the largest EROFS stores/ },
  {
    name: 'more xattr names than listxattr can return',
    tar: () => v2(tree([f('a', { xattrs: Object.fromEntries(Array.from({ length: 300 }, (_, i) => [`user.${'n'.repeat(240)}${i}`, ''])) })])),
    refused: /entry "a": the names of its 300 xattrs take more than 65536 bytes \(XATTR_LIST_MAX\)/,
  },
  { name: 'xattrs that are not an object', tar: () => v2(tree([f('a', { xattrs: ['user.x'] })])), refused: /tree\[0\] "a": "xattrs" must be an object, not \["user\.x"\]/ },
  { name: 'deeply nested JSON in an entry', tar: () => v2(`{"version":2,"tree":[{"path":"a","type":"file","xattrs":{"user.x":${'['.repeat(100_000)}${']'.repeat(100_000)}}}]}`), refused: /tree\[0\] "a": xattr "user\.x": the value must be canonical base64/ },

  // ---- manifest members
  { name: 'an unknown format version', tar: () => v2({ version: 4, tree: [] }), refused: /unsupported format version 4 \(this gear reads versions 1, 2 and 3; upgrade gear on this node\)/, class: 'FailedPrecondition' },
  { name: 'a fractional format version', tar: () => v2({ version: 2.5, tree: [] }), refused: /"version" must be the integer 1, 2 or 3, not 2\.5/ },
  { name: 'a format version as a string', tar: () => v2({ version: '2', tree: [] }), refused: /"version" must be the integer 1, 2 or 3, not "2"/ },
  { name: 'a manifest that is an array', tar: () => v2('[1,2]'), refused: /the manifest must be a JSON object/ },
  { name: 'a manifest that is not UTF-8', tar: () => Buffer.concat([manifestEntry(Buffer.from([0x7b, 0xff, 0xfe, 0x7d])), tarTrailer()]), refused: /\.gear\/index\.json is not valid UTF-8 JSON/ },
  { name: 'a manifest that is not JSON', tar: () => v2('{"version":2,'), refused: /\.gear\/index\.json is not valid UTF-8 JSON/ },
  { name: 'version 2 with a "files" member', tar: () => v2({ version: 2, tree: [], files: [] }), refused: /version 2 has no "files" member/ },
  { name: 'version 2 without a tree', tar: () => v2({ version: 2 }), refused: /version 2 needs "tree" as an array, not nothing/ },
  { name: 'a registry location with a path in it', tar: () => v2(tree([], { location: { registry: 'evil.example/../x', repository: 'a' } })), refused: /location\.registry "evil\.example\/\.\.\/x" is not a registry host\[:port\]/ },
  { name: 'a repository with uppercase letters', tar: () => v2(tree([], { location: { registry: 'r.example:5000', repository: 'Team/App' } })), refused: /location\.repository "Team\/App" is not a repository path/ },
  {
    name: 'unknown members are ignored (format §7)',
    tar: () => v2(tree([withContent('a', A, 5, { chunks: { size: 1 }, hint: true })], { future: { x: 1 } })),
    accepted: (b) => expect(b.files).toBe(1),
  },

  // ---- version 3 pack members (docs/format.md §10)
  {
    name: 'v3: a well-formed pack layout is accepted (two paths of one content share one member)',
    tar: () => v3([withContent('a', A, 5, { pack: 0, offset: 0, length: 5, encoding: 'raw' }), withContent('b', A, 5, { pack: 0, offset: 0, length: 5, encoding: 'raw' }), withContent('c', B, 100, { pack: 0, offset: 5, length: 40 })]),
    accepted: (b) => expect(at(b.root, 'c')).toMatchObject({ type: 'file', size: 100 }),
  },
  { name: 'v3: an offset past the pack', tar: () => v3([withContent('a', A, 5, { pack: 0, offset: 1000, length: 5, encoding: 'raw' })]), refused: /tree\[0\] "a": bytes 1000\+5 run past the end of pack 0/ },
  { name: 'v3: a length that would overflow past 2^53', tar: () => v3([withContent('a', A, 5, { pack: 0, offset: 2 ** 53 - 1, length: 5, encoding: 'raw' })]), refused: /tree\[0\] "a": bytes 9007199254740991\+5 run past the end of pack 0/ },
  { name: 'v3: a length that is not a safe integer', tar: () => v3([withContent('a', A, 5, { pack: 0, offset: 0, length: 2 ** 64 })]), refused: /tree\[0\] "a": "length" must be a whole number/ },
  { name: 'v3: overlapping ranges of two contents', tar: () => v3([withContent('a', A, 50, { pack: 0, offset: 0, length: 30 }), withContent('b', B, 50, { pack: 0, offset: 20, length: 30 })]), refused: /file "b": bytes 20\+30 of pack 0 overlap bytes 0\+30 of gear index: file "a"/ },
  { name: 'v3: a pack that is not listed', tar: () => v3([withContent('a', A, 5, { pack: 7, offset: 0, length: 5, encoding: 'raw' })]), refused: /tree\[0\] "a": "pack" must be a whole number in 0…0, not 7/ },
  {
    name: 'v3: a chunk list that does not add up to the size',
    tar: () => v3([withContent('a', A, 200_000, { chunkSize: 65536, chunks: [0, 1].map((i) => ({ pack: 0, offset: i * 10, length: 10, digest: B })) })]),
    refused: /tree\[0\] "a": 2 chunks do not add up to the size: 200000 bytes in chunks of 65536 is 4 chunks/,
  },
  { name: 'v3: a file with a v2 blob', tar: () => v3([withContent('a', A, 5, { blob: { mediaType: 'application/vnd.gear.file.v1+gzip', digest: B, size: 3 } })]), refused: /"blob" is a version 1\/2 member/ },
  { name: 'v3: a pack digest that is a path', tar: () => v2({ version: 3, packs: [{ digest: '../../etc', size: 10 }], tree: [] }), refused: /packs\[0\]: "digest" must be sha256/ },

  // ---- prefetch lists
  { name: 'a prefetch list naming a directory', tar: () => v2(tree([dir('d'), withContent('d/a')], { prefetch: ['d'] })), refused: /prefetch\[0\] "d" is a dir; prefetch lists only files with content/ },
  { name: 'a prefetch list naming a symlink', tar: () => v2(tree([{ path: 's', type: 'symlink', linkname: 'a' }, withContent('z')], { prefetch: ['s'] })), refused: /prefetch\[0\] "s" is a symlink; prefetch lists only files with content/ },
  { name: 'a prefetch list naming an empty file', tar: () => v2(tree([f('e'), withContent('z')], { prefetch: ['e'] })), refused: /prefetch\[0\] "e" is a regular file without content/ },
  { name: 'a prefetch list naming a missing path', tar: () => v2(tree([withContent('a')], { prefetch: ['../a'] })), refused: /prefetch\[0\] "\.\.\/a" is not a path of the index/ },
  { name: 'a prefetch list repeating a path', tar: () => v2(tree([withContent('a'), withContent('b')], { prefetch: ['a', 'a'] })), refused: /prefetch\[1\] "a" is repeated/ },
  { name: 'a prefetch list longer than the files', tar: () => v2(tree([withContent('a')], { prefetch: ['a', 'a'] })), refused: /"prefetch" lists 2 paths, more than the 1 files with content/ },
  { name: 'a prefetch entry that is not a string', tar: () => v2(tree([withContent('a')], { prefetch: [{ path: 'a' }] })), refused: /prefetch\[0\] must be a path \(a string\), not \{"path":"a"\}/ },

  // ---- the tar around the manifest
  { name: 'the manifest not first in the tar', tar: () => Buffer.concat([entry(h('etc', 'dir')), manifestEntry(JSON.stringify(tree([]))), tarTrailer()]), refused: /not a gear index layer: first entry is "etc\/", not \.gear\/index\.json/ },
  {
    name: 'a manifest entry that is a symlink',
    tar: () => Buffer.concat([entry({ ...manifestHeader(0), type: 'symlink', linkname: '/etc/passwd' }), tarTrailer()]),
    refused: /the first entry \.gear\/index\.json is a symlink; the manifest is a regular file/,
  },
  { name: 'a manifest named ./.gear/index.json', tar: () => Buffer.concat([entry({ ...manifestHeader(0), path: './.gear/index.json' }, Buffer.from('{}')), tarTrailer()]), refused: /first entry is "\.\/\.gear\/index\.json", not \.gear\/index\.json/ },
  { name: 'two manifests (version 2)', tar: () => Buffer.concat([manifestEntry(JSON.stringify(tree([]))), manifestEntry(JSON.stringify(tree([withContent('evil')]))), tarTrailer()]), refused: /version 2 holds only \.gear\/index\.json, but an entry "\.gear\/index\.json" follows it/ },
  { name: 'two manifests (version 1)', tar: () => v1([], [manifestEntry('{}')]), refused: /entry: path "\.gear\/index\.json" is under the reserved \.gear\// },
  { name: 'any entry after a version 2 manifest', tar: () => Buffer.concat([manifestEntry(JSON.stringify(tree([]))), entry(h('etc/passwd', 'file')), tarTrailer()]), refused: /version 2 holds only \.gear\/index\.json, but an entry "etc\/passwd" follows it/ },
  { name: 'a truncated tar (inside the manifest body)', tar: () => v2(tree([withContent('a')])).subarray(0, 600), refused: /truncated tar: input ended inside the body of "\.gear\/index\.json"/ },
  { name: 'a truncated tar (inside a header)', tar: () => v1([], [entry(h('a', 'file'))]).subarray(0, 1024 + 300), refused: /truncated tar: input ended inside a header/ },
  { name: 'an empty tar', tar: () => tarTrailer(), refused: /not a gear index layer: empty tar/ },
  { name: 'a tar header with a bad checksum', tar: () => { const t = v1([], [entry(h('a', 'file'))]); t[1024 + 148] ^= 1; return t; }, refused: /tar entry 1 "a" \(header at offset 1024\): bad header checksum/ },
  { name: 'a tar entry with a negative (base-256) size', tar: () => v1([], [rawEntry('a', (b) => b.fill(0xff, 124, 136))]), refused: /tar entry 1 "a" \(header at offset 1024\): field size is negative/ },
  { name: 'a tar entry of an unsupported type (GNU sparse)', tar: () => v1([], [rawEntry('a', (b) => (b[156] = 0x53))]), refused: /tar entry 1 "a": unsupported type flag "S"/ },
  { name: 'a manifest header claiming more than 256 MiB', tar: () => Buffer.concat([encodeTarHeader(manifestHeader(300 * 1024 * 1024))]), refused: /\.gear\/index\.json is 314572800 bytes, beyond the 268435456 allowed/ },
  {
    name: 'a gzip bomb of a manifest: refused at its header, before the bytes are inflated',
    tar: () => layerBytes(Readable.from([gzipSync(Buffer.concat([encodeTarHeader(manifestHeader(2 ** 33)), Buffer.alloc(32 * 1024 * 1024)]), { level: 9 })])),
    refused: /\.gear\/index\.json is 8589934592 bytes, beyond the 268435456 allowed/,
  },
  {
    name: 'a version 1 layer with a regular file carrying a body',
    tar: () => v1([], [entry(h('a', 'file'), Buffer.from('smuggled'))]),
    refused: /entry "a": a regular file of 8 bytes; in an index layer regular files are empty/,
  },
  { name: 'a version 1 manifest listing a directory', tar: () => v1([{ path: 'd', digest: A, size: 1 }], [entry(h('d', 'dir'))]), refused: /entry "d": listed in the manifest with content, but a dir, not a regular file/ },
  { name: 'a version 1 manifest listing a missing file', tar: () => v1([{ path: 'gone', digest: A, size: 1 }], []), refused: /the manifest lists "gone", but the tar has no regular file of that path/ },
  { name: 'a version 1 entry escaping through a PAX path', tar: () => v1([], [entry(h('x'.repeat(150) + '/../../etc', 'file'))]), refused: /entry: path "x{150}\/\.\.\/\.\.\/etc": "\.\." component/ },
  { name: 'a version 1 hard link to a later entry', tar: () => v1([], [entry(h('a', 'link', { linkname: 'b' })), entry(h('b', 'file'))]), refused: /entry "a": hard link to "b", which is not an earlier non-directory entry/ },
  {
    name: 'a well-formed version 1 layer builds the same tree as version 2',
    tar: () => v1([{ path: 'bin/sh', digest: A, size: 9 }], [entry(h('bin', 'dir')), entry(h('bin/sh', 'file', { mode: 0o755 })), entry(h('bin/sh2', 'link', { linkname: 'bin/sh' }))]),
    accepted: (b) => {
      expect(at(b.root, 'bin/sh')).toMatchObject({ type: 'file', size: 9, mode: 0o755 });
      expect(at(b.root, 'bin/sh2')).toBe(at(b.root, 'bin/sh'));
    },
  },
];

/** A v1 tree entry as raw header bytes, edited by `edit` (checksum recomputed unless the edit breaks it on purpose). */
function rawEntry(name: string, edit: (b: Buffer) => void): Buffer {
  const b = headerBlock({ name, size: 0 });
  edit(b);
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += b[i]!;
  b.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return b;
}

describe('hostile index layers, through read, tree and EROFS image', () => {
  it.each(CASES.map((c) => [c.name, c] as const))('%s', async (_name, c) => {
    const outcome = await pull(c.tar()).then(
      (b) => ({ ok: true as const, b }),
      (err: unknown) => ({ ok: false as const, err }),
    );
    if ('refused' in c) {
      expect(outcome.ok, 'must be refused').toBe(false);
      const err = (outcome as { err: unknown }).err;
      expect(err, String(err)).toBeInstanceOf(GearError);
      expect((err as GearError).class, (err as Error).message).toBe(c.class ?? 'InvalidArgument');
      expect((err as Error).message).toMatch(c.refused);
    } else {
      if (!outcome.ok) throw outcome.err;
      c.accepted(outcome.b);
      expect(outcome.b.image.readUInt32LE(1024)).toBe(0xe0f5e1e2);
    }
  });

  it('holds at least 50 distinct cases', () => {
    expect(new Set(CASES.map((c) => c.name)).size).toBe(CASES.length);
    expect(CASES.length).toBeGreaterThanOrEqual(50);
  });
});
