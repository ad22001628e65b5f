/**
 * Structure-aware generators of hostile tars for the fuzz target: real
 * entries (ustar, PAX, GNU long names, every typeflag) with lying sizes and
 * bogus PAX records, then header-aware byte mutations whose checksums are
 * mostly fixed up again, so that cases get past the checksum into the field
 * parsers instead of stopping at the first check.
 */
import fc from 'fast-check';
import { headerBlock, paxRecords, type RawEntry } from '../unit/fixtures/tarbuild.js';
import { mutate, mutationArb, type Mutation } from './harness.js';

const nameArb: fc.Arbitrary<string> = fc.oneof(
  { weight: 4, arbitrary: fc.stringMatching(/^[a-z]{1,6}(\/[a-z]{1,6}){0,2}\/?$/) },
  {
    weight: 2,
    arbitrary: fc.constantFrom(
      '../x',
      'a/../../x',
      '/abs',
      './a',
      '.',
      '',
      '/',
      'a//b',
      '.wh.a',
      'a/.wh..wh..opq',
      '.wh..wh..opq',
      '.wh..wh.plnk/x',
      '.wh.dir/x',
      '.wh.',
      '.wh..',
      'dev/x',
      '.gear/index.json',
      'é',
      'a\uFFFDb',
      'l',
      'l/victim',
      'l/sub/f',
    ),
  },
  { weight: 1, arbitrary: fc.integer({ min: 90, max: 300 }).map((n) => 'n'.repeat(n)) },
  { weight: 1, arbitrary: fc.string({ maxLength: 20 }) },
);

const paxValue: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom('0', '1', '-1', '1x', '', ' 1', '99999999999999999999', '1.5', '-1.5', '1e3', '4294967295', '0'.repeat(30), '../../etc', '/', 'a\0b', 'y'),
  fc.string({ maxLength: 12 }),
);

const paxKey: fc.Arbitrary<string> = fc.constantFrom(
  'path',
  'linkpath',
  'size',
  'uid',
  'gid',
  'mtime',
  'atime',
  'ctime',
  'uname',
  'gname',
  'comment',
  'hdrcharset',
  'SCHILY.xattr.user.a',
  'SCHILY.xattr.trusted.overlay.opaque',
  'SCHILY.xattr.trusted.overlay.redirect',
  'SCHILY.xattr.security.capability',
  'SCHILY.xattr.',
  'GNU.sparse.major',
  'GNU.sparse.name',
  'LIBARCHIVE.xattr.user.b',
);

/** Raw PAX blocks that break the record grammar in every place it can be broken. */
const bogusPax: fc.Arbitrary<Buffer> = fc.oneof(
  fc.constantFrom('-5 path=a\n', '99 path=a\n', '5 a=b\n', '6 =ab\n', '7 path=a', '07 a=bc\n', '3 a\n', ' 1 a=b\n', '1000000000000000000000 a=b\n', '8 a=b\n\0\0', '6 a=b\n6 a=c\n').map((s) => Buffer.from(s)),
  fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
);

export interface GenEntry {
  raw: RawEntry;
  /** Emit a GNU 'L' (long name) / 'K' (long link) entry before this one. */
  gnuLong?: 'L' | 'K';
  gnuValue?: string;
}

const typeflagArb = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom('0', '0', '0', '5', '2', '1', '3', '4', '6', '7', '\0') },
  { weight: 1, arbitrary: fc.constantFrom('x', 'g', 'L', 'K', 'S', 'V', 'D', 'M', 'N', 'A', 'Z', '8', '9') },
);

export const entryArb: fc.Arbitrary<GenEntry> = fc
  .record({
    name: nameArb,
    typeflag: typeflagArb,
    data: fc.oneof({ weight: 3, arbitrary: fc.constant(undefined) }, { weight: 3, arbitrary: fc.uint8Array({ maxLength: 1100 }) }),
    sizeLie: fc.oneof({ weight: 8, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: -600, max: 600 }) }),
    sizeField: fc.oneof(
      { weight: 12, arbitrary: fc.constant(undefined) },
      { weight: 1, arbitrary: fc.uint8Array({ minLength: 12, maxLength: 12 }).map((b) => (b[0]! |= 0x80, Buffer.from(b))) }, // base-256
      { weight: 1, arbitrary: fc.constantFrom('777777777777', '-0000000001\0', '00000000001 ', ' 1\0\0\0\0\0\0\0\0\0\0', '1e5\0\0\0\0\0\0\0\0\0').map((s) => Buffer.from(s, 'latin1')) },
    ),
    mode: fc.oneof(fc.constantFrom(0o644, 0o755, 0o4755, 0o7777, 0), fc.integer({ min: 0, max: 0o7777777 })),
    uid: fc.oneof(fc.constantFrom(0, 1000, 2097151), fc.integer({ min: 0, max: 2097151 })),
    linkname: fc.oneof(fc.constant(undefined), nameArb, fc.constantFrom('../outside', '../outside/victim', '..', '/', 'l', '/etc/passwd')),
    devmajor: fc.integer({ min: 0, max: 5000 }),
    devminor: fc.integer({ min: 0, max: 2097151 }),
    pax: fc.oneof({ weight: 4, arbitrary: fc.constant(undefined) }, { weight: 2, arbitrary: fc.dictionary(paxKey, paxValue, { maxKeys: 3 }) }),
    paxRaw: fc.oneof({ weight: 10, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: bogusPax }),
    gnuLong: fc.oneof({ weight: 8, arbitrary: fc.constant(undefined) }, { weight: 1, arbitrary: fc.constantFrom('L' as const, 'K' as const) }),
    gnuValue: fc.oneof(nameArb, fc.integer({ min: 100, max: 400 }).map((n) => 'g'.repeat(n))),
  })
  .map((r) => {
    const data = r.data === undefined ? undefined : Buffer.from(r.data);
    const raw: RawEntry = {
      name: r.name,
      typeflag: r.typeflag,
      ...(data !== undefined ? { data } : {}),
      ...(r.sizeLie !== 0 ? { size: Math.max(0, (data?.length ?? 0) + r.sizeLie) } : {}),
      ...(r.sizeField ? { sizeField: r.sizeField } : {}),
      mode: r.mode,
      uid: r.uid,
      gid: r.uid,
      ...(r.linkname !== undefined ? { linkname: r.linkname } : {}),
      devmajor: r.devmajor,
      devminor: r.devminor,
      ...(r.pax ? { pax: r.pax } : {}),
      ...(r.paxRaw ? { paxRaw: r.paxRaw } : {}),
    };
    return { raw, ...(r.gnuLong ? { gnuLong: r.gnuLong, gnuValue: r.gnuValue } : {}) };
  });

function padded(b: Buffer): Buffer {
  return Buffer.concat([b, Buffer.alloc((512 - (b.length % 512)) % 512)]);
}

/** The bytes of one generated entry (its PAX/GNU extension headers first). */
export function encodeEntry(e: GenEntry): Buffer {
  const parts: Buffer[] = [];
  if (e.gnuLong) {
    const v = Buffer.from(`${e.gnuValue ?? ''}\0`);
    parts.push(headerBlock({ name: '././@LongLink', typeflag: e.gnuLong, size: v.length }), padded(v));
  }
  const r = e.raw;
  if (r.pax || r.paxRaw) {
    const pax = r.paxRaw ?? paxRecords(r.pax!);
    parts.push(headerBlock({ name: 'PaxHeaders/x', typeflag: 'x', size: pax.length }), padded(pax));
  }
  parts.push(headerBlock(r));
  if (r.data !== undefined) parts.push(padded(Buffer.from(r.data)));
  return Buffer.concat(parts);
}

/** Recomputes the ustar checksum of the 512-byte block holding `at`. */
export function fixChecksum(buf: Buffer, at: number): void {
  const start = at - (at % 512);
  if (start + 512 > buf.length) return;
  const h = buf.subarray(start, start + 512);
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of h) sum += x;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
}

/** Offsets inside a header block where the parsers branch: name, mode…size, checksum, typeflag, link, magic, prefix. */
const headerOffset = fc.constantFrom(0, 1, 99, 100, 107, 108, 116, 124, 125, 134, 135, 136, 148, 155, 156, 157, 256, 257, 262, 263, 265, 297, 329, 337, 345, 499);

export interface TarCase {
  entries: GenEntry[];
  trailer: 0 | 1 | 2;
  after: Buffer;
  headerMutations: Array<{ block: number; offset: number; byte: number }>;
  mutations: readonly Mutation[];
  fixSums: boolean;
}

export const tarCaseArb: fc.Arbitrary<TarCase> = fc.record({
  entries: fc.array(entryArb, { maxLength: 5 }),
  trailer: fc.constantFrom(0 as const, 1 as const, 2 as const, 2 as const, 2 as const),
  after: fc.oneof({ weight: 6, arbitrary: fc.constant(Buffer.alloc(0)) }, { weight: 1, arbitrary: fc.uint8Array({ minLength: 1, maxLength: 600 }).map((b) => Buffer.from(b)) }),
  headerMutations: fc.array(fc.record({ block: fc.nat({ max: 12 }), offset: headerOffset, byte: fc.integer({ min: 0, max: 255 }) }), { maxLength: 3 }),
  mutations: fc.oneof({ weight: 3, arbitrary: fc.constant<Mutation[]>([]) }, { weight: 1, arbitrary: fc.array(mutationArb, { minLength: 1, maxLength: 3 }) }),
  fixSums: fc.boolean(),
});

/** Builds the tar of a case, applies its mutations (fixing checksums of touched header blocks when asked). */
export function buildTar(c: TarCase, prefix: Buffer[] = []): Buffer {
  let tar: Buffer = Buffer.concat([...prefix, ...c.entries.map(encodeEntry), Buffer.alloc(512 * c.trailer), c.after]);
  const blocks = Math.floor(tar.length / 512);
  for (const m of c.headerMutations) {
    if (blocks === 0) break;
    const at = (m.block % blocks) * 512 + m.offset;
    tar[at] = m.byte;
    if (c.fixSums) fixChecksum(tar, at);
  }
  tar = mutate(tar, c.mutations, c.fixSums ? (at, b) => fixChecksum(b, at) : undefined);
  return tar;
}
