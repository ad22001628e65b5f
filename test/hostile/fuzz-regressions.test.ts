/**
 * Crashes the decoder fuzz target (test/fuzz) found, as fixed cases: the
 * minimized input, and the typed error it must now produce.
 */
import { describe, expect, it } from 'vitest';
import { GearError } from '../../src/core/errors.js';
import { parseFilters } from '../../src/frontends/snapshotter/filters.js';

function typedError(fn: () => unknown): GearError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(GearError);
  return err as GearError;
}

describe('snapshotter filters (test/fuzz/rpc-json.test.ts)', () => {
  it('a \\U escape beyond U+10FFFF is an InvalidArgument, not a RangeError (fuzz: _!="\\U7FFFFFFF)', () => {
    for (const f of ['_!="\\U7FFFFFFF"', 'labels.x=="\\UFFFFFFFF"', 'name=="\\U00110000"']) {
      const err = typedError(() => parseFilters([f]));
      expect(err.class).toBe('InvalidArgument');
      expect(err.message).toMatch(/not a valid Unicode code point/);
    }
  });

  it('surrogate escapes are refused as Go refuses them; valid ones still decode', () => {
    expect(typedError(() => parseFilters(['name=="\\uD800"'])).class).toBe('InvalidArgument');
    const f = parseFilters(['name=="\\U0001F600\\u00e9\\x41"']);
    expect(f.match(() => ['😀éA', true])).toBe(true);
    expect(f.match(() => ['x', true])).toBe(false);
  });
});
