/**
 * Fuzzes the index manifest parser (src/core/index/manifest.ts,
 * parseIndexManifest, versions 1 and 2 as docs/format.md specifies them):
 * arbitrary bytes, arbitrary JSON, and valid v1/v2 manifests with one field
 * replaced by a hostile value, removed or added, or with byte-level
 * mutations of the encoding. Every case ends in a manifest that satisfies
 * the format's rules (and re-encodes to itself), or an InvalidArgument /
 * FailedPrecondition GearError. Then whole index layers (readIndexLayer)
 * built by the real writer and mutated.
 */
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { readIndexLayer, writeIndexLayer } from '../../src/core/index/index-layer.js';
import { comparePaths, encodeIndexManifest, GearMediaType, parseIndexManifest, pathProblem, type IndexManifest } from '../../src/core/index/manifest.js';
import type { TarHeader } from '../../src/core/index/tar.js';
import { indexTarHeader } from '../unit/fixtures/tarbuild.js';
import { anyBytes, anyJson, assertAsync, assertSync, casesRun, count, expectTyped, hex, hostileString, mutate, mutationArb, outcome, outcomeAsync, printCounts, requiredCases } from './harness.js';

const MANIFEST = 'index-manifest';
const LAYER = 'index-layer (readIndexLayer)';

const digestArb = hex(64, 64).map((h) => `sha256:${h}`);
const segArb = fc.stringMatching(/^[a-z0-9._-]{1,6}$/).filter((s) => s !== '.' && s !== '..');
const pathArb = fc.array(segArb, { minLength: 1, maxLength: 3 }).map((p) => p.join('/'));

/** A valid manifest document (as JSON), version 1 or 2, built from sorted unique paths. */
const validDocArb: fc.Arbitrary<Record<string, unknown>> = fc
  .record({
    version: fc.constantFrom(1, 2),
    location: fc.option(fc.record({ registry: fc.constantFrom('registry.example.com:5000', 'localhost', '[::1]:5000'), repository: fc.constantFrom('library/debian', 'a/b-c', 'x') }), { nil: undefined }),
    paths: fc.uniqueArray(pathArb, { maxLength: 6 }),
    sizes: fc.array(fc.integer({ min: 1, max: 2 ** 40 }), { minLength: 6, maxLength: 6 }),
    digests: fc.array(digestArb, { minLength: 6, maxLength: 6 }),
    gz: fc.array(fc.boolean(), { minLength: 6, maxLength: 6 }),
    prefetchN: fc.nat({ max: 3 }),
  })
  .map((r) => {
    // Parents first: the v2 tree lists directories of nested paths.
    const all = new Set<string>();
    for (const p of r.paths) {
      const parts = p.split('/');
      for (let i = 1; i < parts.length; i++) all.add(parts.slice(0, i).join('/'));
    }
    const files = r.paths.filter((p) => !all.has(p)).sort(comparePaths);
    const content = (p: string, i: number) => ({
      digest: r.digests[i % 6],
      size: r.sizes[i % 6],
      ...(r.gz[i % 6] ? { blob: { mediaType: GearMediaType.FileGzip, digest: r.digests[(i + 1) % 6], size: r.sizes[(i + 2) % 6] } } : {}),
    });
    const doc: Record<string, unknown> = { version: r.version };
    if (r.location) doc.location = r.location;
    if (r.version === 1) doc.files = files.map((p, i) => ({ path: p, ...content(p, i) }));
    else {
      const entries = [...[...all].map((p) => ({ path: p, type: 'dir', mode: 0o755 })), ...files.map((p, i) => ({ path: p, type: 'file', mode: 0o644, ...content(p, i) }))];
      entries.sort((a, b) => comparePaths(a.path, b.path));
      doc.tree = entries;
    }
    if (files.length > 0 && r.prefetchN > 0) doc.prefetch = files.slice(0, r.prefetchN);
    return doc;
  });

/** A hostile value for a field: wrong types, boundary numbers, bad digests and paths. */
const hostileValue: fc.Arbitrary<unknown> = fc.oneof(
  anyJson,
  fc.constantFrom(0, -1, 0.5, 2 ** 53, 2 ** 53 + 2, Number.MAX_SAFE_INTEGER, 0o7777 + 1, 0xffffffff + 1, 999_999_999 + 1, 'sha256:' + 'A'.repeat(64), 'sha256:' + 'a'.repeat(63), 'md5:abc', '.gear/x', '.gear', 'a/../b', '/abs', 'a//b', 'a/', 'link', 'symlink', 'char', 'fifo', 'dir', 'file', 'AAAA', 'AAA', '==', GearMediaType.File),
  hostileString,
);

type Step = string | number;

/** All paths to values in a document (for picking a field to mutate). */
function fieldPaths(v: unknown, at: Step[] = [], out: Step[][] = []): Step[][] {
  out.push(at);
  if (Array.isArray(v)) v.forEach((x, i) => fieldPaths(x, [...at, i], out));
  else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) fieldPaths(x, [...at, k], out);
  return out;
}

function edit(doc: unknown, at: Step[], op: 'set' | 'delete' | 'add', value: unknown, key: string): unknown {
  const copy = structuredClone(doc);
  if (at.length === 0) return op === 'set' ? value : copy;
  let parent: any = copy;
  for (const s of at.slice(0, -1)) parent = parent[s];
  const last = at[at.length - 1]!;
  if (op === 'set') parent[last] = value;
  else if (op === 'delete') {
    if (Array.isArray(parent)) parent.splice(Number(last), 1);
    else delete parent[last];
  } else {
    const target = parent[last];
    if (Array.isArray(target)) target.push(value);
    else if (target && typeof target === 'object') target[key] = value;
    else parent[last] = value;
  }
  return copy;
}

const mutatedDocArb = fc
  .tuple(validDocArb, fc.array(fc.tuple(fc.nat(), fc.constantFrom('set', 'set', 'delete', 'add') as fc.Arbitrary<'set' | 'delete' | 'add'>, hostileValue, fc.constantFrom('extra', 'files', 'tree', 'digest', 'size', 'blob', 'linkname', 'xattrs', 'devmajor', '__proto__', 'mtimeNsec')), { minLength: 1, maxLength: 3 }))
  .map(([doc, edits]) => {
    let d: unknown = doc;
    for (const [pick, op, value, key] of edits) {
      const paths = fieldPaths(d);
      d = edit(d, paths[pick % paths.length]!, op, value, key);
    }
    return d;
  });

/** The format's rules on an accepted manifest, and the canonical re-encoding round trip. */
function checkAccepted(m: IndexManifest): void {
  if (m.version !== 1 && m.version !== 2) throw new Error(`version ${m.version} accepted`);
  let prev: string | undefined;
  for (const f of m.files) {
    if (pathProblem(f.path)) throw new Error(`unclean path ${JSON.stringify(f.path)} accepted`);
    if (f.path === '.gear' || f.path.startsWith('.gear/')) throw new Error('path under .gear/ accepted');
    if (!/^sha256:[a-f0-9]{64}$/.test(f.digest) || !Number.isSafeInteger(f.size) || f.size <= 0) throw new Error('bad digest/size accepted');
    if (m.version === 1 && prev !== undefined && comparePaths(prev, f.path) >= 0) throw new Error('unsorted files accepted');
    prev = f.path;
  }
  for (const p of m.prefetch ?? []) if (!m.files.some((f) => f.path === p)) throw new Error(`prefetch ${p} not a file`);
  const once = encodeIndexManifest(m);
  if (!encodeIndexManifest(parseIndexManifest(once)).equals(once)) throw new Error('manifest does not survive its canonical encoding');
}

/** TextDecoder (fatal) reports bad UTF-8 as a TypeError by spec; parseIndexManifest wraps it as "not valid UTF-8 JSON". */
const utf8Cause = (cause: Error): boolean => (cause as Error & { code?: string }).code === 'ERR_ENCODING_INVALID_ENCODED_DATA';

function parseCase(bytes: Uint8Array): void {
  outcome(
    () => parseIndexManifest(bytes),
    (err) => expectTyped(err, ['InvalidArgument', 'FailedPrecondition'], 'parseIndexManifest', utf8Cause),
    checkAccepted,
  );
}

const enc = (doc: unknown) => new Uint8Array(Buffer.from(JSON.stringify(doc) ?? 'null'));

afterAll(() => {
  printCounts('index-manifest.test.ts');
});

describe('index manifest parser', () => {
  it('arbitrary bytes', () => {
    assertSync('manifest: bytes', anyBytes(400), 8_000, (b) => {
      count(MANIFEST);
      parseCase(b);
    });
  });

  it('arbitrary JSON, and objects with the real member names', () => {
    const shaped = fc.record({ version: fc.oneof(fc.constantFrom(1, 2, 3, 0, 1.5, '1'), anyJson), files: anyJson, tree: anyJson, location: anyJson, prefetch: anyJson }, { requiredKeys: [] });
    assertSync('manifest: json', fc.oneof(anyJson, shaped), 10_000, (doc) => {
      count(MANIFEST);
      parseCase(enc(doc));
    });
  });

  it('valid v1/v2 manifests are accepted and round-trip', () => {
    assertSync('manifest: valid', validDocArb, 5_000, (doc) => {
      count(MANIFEST);
      checkAccepted(parseIndexManifest(enc(doc)));
    });
  });

  it('valid manifests with fields replaced by hostile values, removed or added', () => {
    assertSync('manifest: mutated fields', mutatedDocArb, 20_000, (doc) => {
      count(MANIFEST);
      parseCase(enc(doc));
    });
  });

  it('valid manifests with byte-level mutations of the encoding', () => {
    assertSync('manifest: mutated bytes', fc.tuple(validDocArb, fc.array(mutationArb, { minLength: 1, maxLength: 4 })), 7_000, ([doc, ms]) => {
      count(MANIFEST);
      parseCase(new Uint8Array(mutate(Buffer.from(enc(doc)), ms)));
    });
    expect(casesRun(MANIFEST)).toBeGreaterThanOrEqual(requiredCases(50_000));
  });
});

describe('index layers (readIndexLayer over the real writer, mutated)', () => {
  it('mutated index layers end in a validated layer or a typed error', async () => {
    await assertAsync('index layer', fc.tuple(validDocArb, fc.array(mutationArb, { maxLength: 3 }), fc.integer({ min: 1, max: 4096 })), 5_000, async ([doc, ms, chunk]) => {
      count(LAYER);
      const m = parseIndexManifest(enc(doc));
      const entries: TarHeader[] = m.tree ?? m.files.map((f) => indexTarHeader(f.path, 'file'));
      const parts: Buffer[] = [];
      for await (const c of writeIndexLayer(m, entries)) parts.push(c);
      const tar = mutate(Buffer.concat(parts), ms);
      const chunks: Buffer[] = [];
      for (let i = 0; i < tar.length; i += chunk) chunks.push(tar.subarray(i, i + chunk));
      await outcomeAsync(
        () => readIndexLayer((async function* () { yield* chunks; })()),
        (err) => expectTyped(err, ['InvalidArgument', 'FailedPrecondition'], 'readIndexLayer', utf8Cause),
        (layer) => checkAccepted(layer.manifest),
      );
    });
    expect(casesRun(LAYER)).toBeGreaterThanOrEqual(requiredCases(5_000));
  });
});
