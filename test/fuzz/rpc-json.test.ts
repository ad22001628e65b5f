/**
 * Fuzzes the graph-driver RPC decoders (src/frontends/graphdriver/protocol.ts):
 * the raw request body → parseBody → the verb's decoder, exactly as server.ts
 * chains them (JSON_VERBS), and ApplyDiff's query-string parser. Every case
 * ends in a decoded request that satisfies the protocol's invariants, or an
 * InvalidArgument GearError; anything else is a crash.
 *
 * Also the snapshotter's List filter parser (the one pure validator of a gRPC
 * request field, src/frontends/snapshotter/filters.ts).
 */
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import {
  decodeDriverRequest,
  decodeInitRequest,
  parseApplyDiffQuery,
  parseBody,
  toWireError,
} from '../../src/frontends/graphdriver/protocol.js';
import { parseFilters } from '../../src/frontends/snapshotter/filters.js';
import {
  anyBytes,
  anyJson,
  assertSync,
  casesRun,
  count,
  expectTyped,
  hex,
  hostileString,
  mutate,
  mutationArb,
  outcome,
  printCounts,
  requiredCases,
} from './harness.js';

const RPC = 'graphdriver-rpc';
const QUERY = 'graphdriver-applydiff-query';
const FILTERS = 'snapshotter-filters';

/** Verbs by how server.ts decodes their body. */
const VERBS = ['Init', 'Create', 'CreateReadWrite', 'Remove', 'Get', 'Put', 'Exists', 'Status', 'GetMetadata', 'Cleanup', 'Changes', 'DiffSize', 'Capabilities', 'Diff'] as const;
type Verb = (typeof VERBS)[number];
const WITH_PARENT: ReadonlySet<Verb> = new Set(['Create', 'CreateReadWrite', 'Changes', 'DiffSize', 'Diff']);
const NO_BODY: ReadonlySet<Verb> = new Set(['Status', 'Cleanup', 'Capabilities']);

const ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/;

function checkId(id: string, allowEmpty: boolean): void {
  if (allowEmpty && id === '') return;
  if (!ID_RE.test(id) || id.includes('..') || id.includes('/')) throw new Error(`decoder accepted a bad layer id ${JSON.stringify(id)}`);
}

/** The decode step of one verb, as server.ts runs it, with the protocol's invariants on success. */
function decodeVerb(verb: Verb, raw: Buffer): void {
  outcome(
    () => {
      const body = parseBody(raw);
      if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new Error('parseBody returned a non-object');
      if (NO_BODY.has(verb)) return;
      if (verb === 'Init') {
        const r = decodeInitRequest(body);
        if (typeof r.Home !== 'string' || !r.Opts.every((o) => typeof o === 'string')) throw new Error('Init decoded to bad types');
        for (const maps of [r.UIDMaps, r.GIDMaps]) {
          for (const m of maps ?? []) {
            if (![m.container_id, m.host_id, m.size].every(Number.isInteger)) throw new Error('IdMap decoded to a non-integer');
          }
        }
        return;
      }
      const r = decodeDriverRequest(body, { parent: WITH_PARENT.has(verb) });
      checkId(r.ID, false);
      checkId(r.Parent, true);
      if (typeof r.MountLabel !== 'string') throw new Error('MountLabel decoded to a non-string');
      for (const v of Object.values(r.StorageOpt)) if (typeof v !== 'string') throw new Error('StorageOpt value decoded to a non-string');
    },
    (err) => {
      expectTyped(err, ['InvalidArgument'], `${verb} decoder`);
      // The wire form of the error must be producible too (server.ts sends it as Err).
      if (!toWireError(err).startsWith('InvalidArgument: ')) throw new Error(`bad wire error ${toWireError(err)}`);
    },
  );
}

const verbArb = fc.constantFrom(...VERBS);

/** A layer-id-ish value: valid ids, near misses, hostile strings, other JSON. */
const idValue: fc.Arbitrary<unknown> = fc.oneof(
  { weight: 3, arbitrary: fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,70}$/) },
  { weight: 1, arbitrary: hex(64, 64).map((h) => `${h}-init`) },
  { weight: 2, arbitrary: hostileString },
  { weight: 1, arbitrary: anyJson },
);

const storageOptArb: fc.Arbitrary<unknown> = fc.oneof(
  fc.dictionary(fc.oneof(fc.constantFrom('size', '__proto__', 'constructor', ''), fc.string({ maxLength: 10 })), fc.oneof(fc.string({ maxLength: 10 }), anyJson), { maxKeys: 4 }),
  anyJson,
);

const idMapArb: fc.Arbitrary<unknown> = fc.oneof(
  fc.record(
    { container_id: fc.oneof(fc.integer(), anyJson), host_id: fc.oneof(fc.integer(), anyJson), size: fc.oneof(fc.integer(), anyJson) },
    { requiredKeys: [] },
  ),
  anyJson,
);

/** Bodies shaped like moby's graphDriverRequest / graphDriverInitRequest, every field possibly wrong. */
const requestShaped: fc.Arbitrary<Record<string, unknown>> = fc.record(
  {
    ID: idValue,
    Parent: idValue,
    MountLabel: fc.oneof(fc.string({ maxLength: 20 }), anyJson),
    StorageOpt: storageOptArb,
    Home: fc.oneof(fc.constantFrom('/var/lib/docker/gear', ''), hostileString, anyJson),
    Opts: fc.oneof(fc.array(fc.oneof(fc.string({ maxLength: 12 }), anyJson), { maxLength: 4 }), anyJson),
    UIDMaps: fc.oneof(fc.array(idMapArb, { maxLength: 3 }), anyJson),
    GIDMaps: fc.oneof(fc.array(idMapArb, { maxLength: 3 }), anyJson),
    extra: anyJson,
  },
  { requiredKeys: [] },
);

/** The body as bytes: compact JSON, pretty JSON, or JSON with leading/trailing junk. */
function encodeBody(doc: unknown, style: number): Buffer {
  const text = JSON.stringify(doc) ?? 'null';
  if (style === 1) return Buffer.from(JSON.stringify(doc, null, 2) ?? 'null');
  if (style === 2) return Buffer.from(` \n${text}\r\n `);
  if (style === 3) return Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(text)]); // BOM
  return Buffer.from(text);
}

afterAll(() => {
  printCounts('rpc-json.test.ts');
});

describe('graph-driver RPC decoders', () => {
  it('arbitrary bytes through parseBody and every verb decoder', () => {
    assertSync('rpc: bytes', fc.tuple(verbArb, anyBytes(600)), 15_000, ([verb, bytes]) => {
      count(RPC);
      decodeVerb(verb, Buffer.from(bytes));
    });
  });

  it('arbitrary JSON documents through every verb decoder', () => {
    assertSync('rpc: json', fc.tuple(verbArb, anyJson, fc.integer({ min: 0, max: 3 })), 10_000, ([verb, doc, style]) => {
      count(RPC);
      decodeVerb(verb, encodeBody(doc, style));
    });
  });

  it('request-shaped bodies with hostile field values', () => {
    assertSync('rpc: shaped', fc.tuple(verbArb, requestShaped, fc.integer({ min: 0, max: 3 })), 20_000, ([verb, doc, style]) => {
      count(RPC);
      decodeVerb(verb, encodeBody(doc, style));
    });
  });

  it('request-shaped bodies with byte-level mutations (truncated, spliced, flipped)', () => {
    assertSync(
      'rpc: mutated',
      fc.tuple(verbArb, requestShaped, fc.array(mutationArb, { minLength: 1, maxLength: 4 })),
      10_000,
      ([verb, doc, ms]) => {
        count(RPC);
        decodeVerb(verb, mutate(Buffer.from(JSON.stringify(doc)), ms));
      },
    );
  });

  it('deeply nested and oversized bodies', () => {
    const deep = (n: number) => Buffer.from('{"ID":' + '['.repeat(n) + ']'.repeat(n) + '}');
    for (const n of [1, 1000, 100_000, 500_000]) {
      count(RPC);
      decodeVerb('Get', deep(n));
    }
    count(RPC);
    decodeVerb('Create', Buffer.from(JSON.stringify({ ID: 'a', StorageOpt: Object.fromEntries(Array.from({ length: 50_000 }, (_, i) => [`k${i}`, 'v'])) })));
  });

  it('ApplyDiff query strings', () => {
    const part = fc.oneof(
      fc.tuple(fc.constantFrom('id', 'parent', 'ID', 'id ', ''), fc.oneof(idValue.map((v) => String(v)), fc.constantFrom('%', '%zz', '%2', '%C0%AF', '%00', '%2e%2e', '%2F', 'a+b', 'a=b'))).map(([k, v]) => `${k}=${v}`),
      fc.constantFrom('', 'id', 'parent', '&', '=', '=='),
      fc.string({ maxLength: 12 }),
    );
    const url = fc.tuple(fc.constantFrom('/GraphDriver.ApplyDiff', '', '/x?y'), fc.boolean(), fc.array(part, { maxLength: 5 }), fc.string({ maxLength: 8 })).map(
      ([p, q, parts, tail]) => `${p}${q ? '?' : ''}${parts.join('&')}${tail}`,
    );
    assertSync('rpc: applydiff query', url, 20_000, (u) => {
      count(QUERY);
      outcome(
        () => parseApplyDiffQuery(u),
        (err) => expectTyped(err, ['InvalidArgument'], 'parseApplyDiffQuery'),
        (r) => {
          checkId(r.id, false);
          checkId(r.parent, true);
        },
      );
    });
  });

  it('ran at least 50,000 cases over the RPC body decoders', () => {
    expect(casesRun(RPC)).toBeGreaterThanOrEqual(requiredCases(50_000));
  });
});

// ---------------------------------------------------------------------------
// Snapshotter filters

const fieldArb = fc.oneof(
  fc.constantFrom('name', 'parent', 'kind', 'labels', 'labels."a.b"', 'labels.x', '"quoted"', 'a_b', ''),
  fc.stringMatching(/^[A-Za-z0-9_]{1,8}$/),
);
const escapeArb = fc.oneof(
  fc.constantFrom('\\n', '\\t', '\\\\', '\\"', '\\a', '\\v', '\\x41', '\\x4', '\\u00e9', '\\uD800', '\\uDFFF', '\\U0001F600', '\\U00110000', '\\UFFFFFFFF', '\\U7FFFFFFF', '\\101', '\\777', '\\8', '\\q', '\\'),
  hex(0, 9).map((h) => `\\U${h}`),
  hex(0, 5).map((h) => `\\u${h}`),
);
const quotedArb = fc
  .tuple(fc.constantFrom('"', '/', '|'), fc.array(fc.oneof(fc.string({ maxLength: 4 }), escapeArb), { maxLength: 4 }), fc.boolean())
  .map(([q, parts, close]) => `${q}${parts.join('')}${close ? q : ''}`);
const valueArb = fc.oneof(fc.stringMatching(/^[^\s,]{1,10}$/), quotedArb, fc.constantFrom('(a+)+', '[', '(?<', '\\', '.*', 'a{2,1}'));
const selectorArb = fc
  .tuple(fc.array(fieldArb, { minLength: 1, maxLength: 3 }), fc.constantFrom('', '==', '!=', '~=', '=', '!', '~'), valueArb, fc.constantFrom('', ' ', '\t'))
  .map(([path, op, value, sp]) => `${sp}${path.join('.')}${sp}${op}${op ? sp + value : ''}`);
const filterArb = fc.oneof(
  { weight: 4, arbitrary: fc.array(selectorArb, { minLength: 1, maxLength: 3 }).map((s) => s.join(',')) },
  { weight: 1, arbitrary: fc.string({ maxLength: 30 }) },
  { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 30 }) },
);

describe('snapshotter List filter parser', () => {
  it('filter strings parse to a matcher or an InvalidArgument, and matching never throws', () => {
    const values = fc.dictionary(fc.constantFrom('name', 'parent', 'kind', 'labels.x', 'labels.a.b'), fc.string({ maxLength: 12 }), { maxKeys: 5 });
    assertSync('filters', fc.tuple(fc.array(filterArb, { minLength: 1, maxLength: 3 }), values), 50_000, ([filters, fields]) => {
      count(FILTERS);
      outcome(
        () => parseFilters(filters),
        (err) => expectTyped(err, ['InvalidArgument'], 'parseFilters'),
        (f) => {
          const read = (p: string[]): [string, boolean] => {
            const k = p.join('.');
            return Object.hasOwn(fields, k) ? [fields[k]!, true] : ['', false];
          };
          const m = f.match(read);
          if (typeof m !== 'boolean') throw new Error('match returned a non-boolean');
        },
      );
    });
    expect(casesRun(FILTERS)).toBeGreaterThanOrEqual(requiredCases(50_000));
  });
});
