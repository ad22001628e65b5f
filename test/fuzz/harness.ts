/**
 * Shared plumbing of the decoder fuzz target (test/fuzz, vitest project
 * "fuzz", `make fuzz`).
 *
 * - Reproducible: every property runs with one fixed seed (GEAR_FUZZ_SEED to
 *   change it); fast-check prints the seed and the shrunk counterexample's
 *   path on failure, and `reproduce()` names the command that replays it.
 * - Counted: each decoder's cases are counted as they run and printed
 *   ("fuzz: <decoder>: N cases"), and every test asserts its own total, so a
 *   property that silently ran fewer cases fails.
 * - Bounded: GEAR_FUZZ_SCALE multiplies every numRuns (1 by default: at least
 *   50,000 cases per decoder); each case has a time bound (a hang or a
 *   super-linear blow-up fails the case), and each property checks that the
 *   heap did not grow without bound.
 *
 * "Crash" means anything but a clean result or the decoder's own typed
 * validation error: a TypeError, a RangeError, a stack overflow, a GearError
 * of the wrong class, a hang, an unbounded allocation.
 */
import fc from 'fast-check';
import { GearError, type ErrorClass } from '../../src/core/errors.js';

export const FUZZ_SEED = Number(process.env.GEAR_FUZZ_SEED ?? 0x6ea7_2026);
const SCALE = Number(process.env.GEAR_FUZZ_SCALE ?? 1);

/** Runs per property, scaled by GEAR_FUZZ_SCALE (never below 1). */
export function runs(n: number): number {
  return Math.max(1, Math.round(n * (Number.isFinite(SCALE) && SCALE > 0 ? SCALE : 1)));
}

/** The case count a decoder's test must reach: `n` at the default scale, n × GEAR_FUZZ_SCALE below it. */
export function requiredCases(n: number): number {
  return Number.isFinite(SCALE) && SCALE > 0 && SCALE < 1 ? Math.floor(n * SCALE * 0.99) : n;
}

/** Wall-clock bound of one case. Generous: a correctness bound against hangs, not a speed assertion. */
export const CASE_TIME_LIMIT_MS = 5_000;

const counts = new Map<string, number>();

/** Counts one executed case of `decoder`. */
export function count(decoder: string): void {
  counts.set(decoder, (counts.get(decoder) ?? 0) + 1);
}

export function casesRun(decoder: string): number {
  return counts.get(decoder) ?? 0;
}

/** Prints the per-decoder totals (one line each) and returns them. */
export function printCounts(file: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [decoder, n] of [...counts.entries()].sort()) {
    out[decoder] = n;
    console.log(`fuzz: ${decoder}: ${n} cases (seed ${FUZZ_SEED}, ${file})`);
  }
  return out;
}

function reproduce(): string {
  return `replay: GEAR_FUZZ_SEED=${FUZZ_SEED} npx vitest run --project fuzz (fast-check's seed/path above shrink to the case)`;
}

/** Heap bound after a property: fuzz inputs are small, so a decoder that allocates by a claimed size shows here. */
const HEAP_LIMIT = 1.5 * 1024 ** 3;

function checkHeap(name: string): void {
  const used = process.memoryUsage();
  if (used.heapUsed + used.arrayBuffers > HEAP_LIMIT) {
    throw new Error(`${name}: heap grew to ${Math.round((used.heapUsed + used.arrayBuffers) / 2 ** 20)} MiB (unbounded allocation?)`);
  }
}

/** fc.assert with the fixed seed, a per-case time bound and a heap check; the failure names how to replay it. */
export function assertSync<T>(name: string, arb: fc.Arbitrary<T>, numRuns: number, pred: (v: T) => void): void {
  const prop = fc.property(arb, (v) => {
    const start = performance.now();
    pred(v);
    const ms = performance.now() - start;
    if (ms > CASE_TIME_LIMIT_MS) throw new Error(`${name}: one case took ${Math.round(ms)} ms (hang or blow-up)`);
  });
  try {
    fc.assert(prop, { seed: FUZZ_SEED, numRuns: runs(numRuns), endOnFailure: false });
  } catch (err) {
    throw new Error(`${name}: ${(err as Error).message}\n${reproduce()}`, { cause: err });
  }
  checkHeap(name);
}

/** The async form: each case also races a timer, so a promise that never settles fails the case. */
export async function assertAsync<T>(name: string, arb: fc.Arbitrary<T>, numRuns: number, pred: (v: T) => Promise<void>): Promise<void> {
  const prop = fc.asyncProperty(arb, async (v) => {
    let timer: NodeJS.Timeout | undefined;
    const hang = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${name}: case did not settle within ${CASE_TIME_LIMIT_MS} ms (hang)`)), CASE_TIME_LIMIT_MS);
    });
    try {
      await Promise.race([pred(v), hang]);
    } finally {
      clearTimeout(timer);
    }
  });
  try {
    await fc.assert(prop, { seed: FUZZ_SEED, numRuns: runs(numRuns), endOnFailure: false });
  } catch (err) {
    throw new Error(`${name}: ${(err as Error).message}\n${reproduce()}`, { cause: err });
  }
  checkHeap(name);
}

/** Errors a decoder must never let out, at any depth of the cause chain. */
const CRASH_TYPES = [TypeError, RangeError, ReferenceError, SyntaxError, EvalError, URIError];

function crashInChain(err: unknown, allowCauseSyntaxError: boolean): Error | undefined {
  let cur: unknown = err;
  for (let depth = 0; cur instanceof Error && depth < 8; depth++) {
    const isSyntax = cur instanceof SyntaxError;
    // JSON.parse reports malformed JSON as a SyntaxError: fine as the *cause* of a typed error.
    if (CRASH_TYPES.some((t) => cur instanceof t) && !(isSyntax && allowCauseSyntaxError && depth > 0)) return cur;
    cur = (cur as Error & { cause?: unknown }).cause;
  }
  return undefined;
}

/**
 * Throws (failing the case) unless err is a GearError of one of `classes`
 * with a message, and no TypeError/RangeError/… hides in its causes.
 */
export function expectTyped(err: unknown, classes: readonly ErrorClass[], what: string, allowCause?: (cause: Error) => boolean): void {
  if (!(err instanceof GearError)) {
    throw new Error(`${what}: crashed with ${describe(err)} instead of a typed GearError`, { cause: err });
  }
  if (!classes.includes(err.class)) {
    throw new Error(`${what}: GearError of class ${err.class} (${err.message}), expected ${classes.join('|')}`, { cause: err });
  }
  if (err.message.trim() === '') throw new Error(`${what}: typed error without a message`, { cause: err });
  const hidden = crashInChain(err, true);
  if (hidden && !allowCause?.(hidden)) throw new Error(`${what}: typed error wraps a crash: ${describe(hidden)}`, { cause: err });
}

/**
 * For decoders whose own validation errors are plain Errors (tar-stream, the
 * PAX parser under it: applyLayer turns them into InvalidArgument): a plain
 * Error or a GearError of `classes` is clean; a TypeError/RangeError/… or a
 * non-Error is a crash.
 */
export function expectCleanError(err: unknown, classes: readonly ErrorClass[], what: string, allowCause?: (cause: Error) => boolean): void {
  if (err instanceof GearError) return expectTyped(err, classes, what, allowCause);
  if (!(err instanceof Error) || err.constructor !== Error) {
    throw new Error(`${what}: crashed with ${describe(err)}`, { cause: err });
  }
  const hidden = crashInChain(err, true);
  if (hidden) throw new Error(`${what}: error wraps a crash: ${describe(hidden)}`, { cause: err });
}

export function describe(err: unknown): string {
  if (err instanceof Error) return `${err.constructor.name}: ${err.message}`;
  return `non-Error ${typeof err}: ${String(err)}`;
}

/** Runs fn; a thrown error goes through check, a result through onOk. */
export function outcome<T>(fn: () => T, onError: (err: unknown) => void, onOk: (v: T) => void = () => {}): void {
  let v: T;
  try {
    v = fn();
  } catch (err) {
    onError(err);
    return;
  }
  onOk(v);
}

export async function outcomeAsync<T>(fn: () => Promise<T>, onError: (err: unknown) => void, onOk: (v: T) => void | Promise<void> = () => {}): Promise<void> {
  let v: T;
  try {
    v = await fn();
  } catch (err) {
    onError(err);
    return;
  }
  await onOk(v);
}

// ---------------------------------------------------------------------------
// Shared arbitraries

/** Strings that trip validators: traversal, NUL, slashes, unicode, lone surrogates, very long. */
export const hostileString: fc.Arbitrary<string> = fc.oneof(
  fc.constantFrom(
    '',
    '.',
    '..',
    '../x',
    'a/../../b',
    '/',
    '/abs',
    'a/b',
    'a\0b',
    '\0',
    '%2e%2e',
    '..%2f',
    ' ',
    '\n',
    '\uFFFD',
    '\uD800',
    'é',
    '__proto__',
    'constructor',
    'toString',
    'a'.repeat(128),
    'a'.repeat(129),
    'x'.repeat(5000),
  ),
  fc.string({ maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
);

/** Lowercase hex strings. */
export const hex = (minLength: number, maxLength: number): fc.Arbitrary<string> =>
  fc.string({ unit: fc.constantFrom(...'0123456789abcdef'), minLength, maxLength });

/** Any JSON value, biased to the shapes validators branch on. */
export const anyJson: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(null, true, false, 0, -0, 1, -1, 1.5, 2 ** 53, 2 ** 64, -(2 ** 53), 1e308, '', [], {}),
  hostileString,
  fc.jsonValue({ maxDepth: 3 }),
);

/** Bytes; sometimes mostly printable so text decoders get further. */
export const anyBytes = (maxLength: number): fc.Arbitrary<Uint8Array> =>
  fc.oneof(
    fc.uint8Array({ maxLength }),
    fc.string({ maxLength }).map((s) => new Uint8Array(Buffer.from(s, 'utf8'))),
  );

/** Byte-level mutations of an encoded input: overwrite, insert, delete, truncate. */
export type Mutation =
  | { kind: 'set'; at: number; byte: number }
  | { kind: 'insert'; at: number; bytes: Uint8Array }
  | { kind: 'delete'; at: number; n: number }
  | { kind: 'truncate'; at: number };

export const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ kind: fc.constant('set' as const), at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), n: fc.integer({ min: 1, max: 16 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }) },
);

/** Applies mutations; offsets are taken modulo the current length. `onSet` sees each overwritten offset. */
export function mutate(input: Buffer, ms: readonly Mutation[], onSet?: (at: number, buf: Buffer) => void): Buffer {
  let b = Buffer.from(input);
  for (const m of ms) {
    if (b.length === 0) break;
    const at = m.at % b.length;
    if (m.kind === 'set') {
      b[at] = m.byte;
      onSet?.(at, b);
    } else if (m.kind === 'insert') b = Buffer.concat([b.subarray(0, at), Buffer.from(m.bytes), b.subarray(at)]);
    else if (m.kind === 'delete') b = Buffer.concat([b.subarray(0, at), b.subarray(at + m.n)]);
    else b = b.subarray(0, at);
  }
  return b;
}
