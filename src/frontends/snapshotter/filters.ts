/**
 * containerd's filter language, as List (Walk) receives it:
 *
 *   filters   := one string per alternative; a snapshot matches if ANY matches
 *   selectors := selector ("," selector)*          all must match
 *   selector  := fieldpath [ ("==" | "!=" | "~=") value ]   no operator: presence
 *   fieldpath := field ("." field)*                 field: [A-Za-z0-9_]+ or "quoted"
 *   value     := "quoted" | [^\s,]+   (for ~= also /quoted/ or |quoted|)
 *
 * containerd 1.6's metadata layer re-checks results, but its conformance suite
 * talks to us directly and checks filtering itself, so we implement it.
 * Fields of a snapshot: name, parent, kind (view|active|committed), labels.<key>.
 */
import { invalidArgument } from '../../core/errors.js';

type Operator = 'present' | '==' | '!=' | '~=';

interface Selector {
  fieldpath: string[];
  operator: Operator;
  value: string;
  re?: RegExp;
}

/** Reads one field of the filtered object: [value, present]. */
export type FieldReader = (fieldpath: string[]) => [string, boolean];

/** A parsed filter set: any of the alternatives, each a conjunction of selectors. */
export interface Filter {
  match(read: FieldReader): boolean;
}

const isFieldChar = (c: string) => /[A-Za-z0-9_]/.test(c);
const isQuote = (c: string) => c === '"' || c === '/' || c === '|';

class Parser {
  private pos = 0;
  constructor(private readonly input: string) {}

  private error(msg: string): never {
    throw invalidArgument(`filters: parse error at ${this.pos} in ${JSON.stringify(this.input)}: ${msg}`);
  }

  private skipSpace(): void {
    while (this.pos < this.input.length && /\s/.test(this.input[this.pos]!)) this.pos++;
  }

  private peek(): string {
    this.skipSpace();
    return this.input[this.pos] ?? '';
  }

  /** A quoted literal starting at pos (Go string syntax for the escapes we accept). */
  private quoted(allowAlt: boolean): string {
    const q = this.input[this.pos]!;
    if (!allowAlt && q !== '"') this.error('invalid quote encountered');
    let out = '';
    this.pos++;
    for (;;) {
      const c = this.input[this.pos];
      if (c === undefined || c === '\n') this.error('quoted literal not terminated');
      this.pos++;
      if (c === q) return out;
      if (c !== '\\') {
        out += c;
        continue;
      }
      const e = this.input[this.pos++];
      const simple: Record<string, string> = { a: '\x07', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t', v: '\v', '\\': '\\' };
      if (e === undefined) this.error('quoted literal not terminated');
      if (e === q) out += q;
      else if (e in simple) out += simple[e];
      else if (e === 'x' || e === 'u' || e === 'U') {
        const n = e === 'x' ? 2 : e === 'u' ? 4 : 8;
        const hex = this.input.slice(this.pos, this.pos + n);
        if (!new RegExp(`^[0-9a-fA-F]{${n}}$`).test(hex)) this.error('illegal numeric escape sequence');
        const cp = parseInt(hex, 16);
        // Go's UnquoteChar: \u and \U must name a valid rune (no surrogate, at most U+10FFFF).
        if (e !== 'x' && (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))) this.error(`escape \\${e}${hex} is not a valid Unicode code point`);
        out += String.fromCodePoint(cp);
        this.pos += n;
      } else if (/[0-7]/.test(e)) {
        const oct = this.input.slice(this.pos - 1, this.pos + 2);
        if (!/^[0-7]{3}$/.test(oct)) this.error('illegal numeric escape sequence');
        out += String.fromCharCode(parseInt(oct, 8));
        this.pos += 2;
      } else this.error('illegal escape sequence');
    }
  }

  private field(): string {
    const c = this.peek();
    if (c === '"') return this.quoted(false);
    if (!c || !isFieldChar(c)) this.error('expected field or quoted');
    const start = this.pos;
    while (this.pos < this.input.length && isFieldChar(this.input[this.pos]!)) this.pos++;
    return this.input.slice(start, this.pos);
  }

  private selector(): Selector {
    const fieldpath = [this.field()];
    while (this.peek() === '.') {
      this.pos++;
      fieldpath.push(this.field());
    }
    const c = this.peek();
    if (c === '' || c === ',') return { fieldpath, operator: 'present', value: '' };
    const op = this.input.slice(this.pos, this.pos + 2);
    if (op !== '==' && op !== '!=' && op !== '~=') this.error(`expected an operator ("=="|"!="|"~=")`);
    this.pos += 2;
    const v = this.peek();
    let value: string;
    if (v && isQuote(v)) value = this.quoted(op === '~=');
    else {
      const start = this.pos;
      while (this.pos < this.input.length && this.input[this.pos] !== ',' && !/\s/.test(this.input[this.pos]!)) this.pos++;
      value = this.input.slice(start, this.pos);
      if (!value) this.error('expected value or quoted');
    }
    const sel: Selector = { fieldpath, operator: op, value };
    if (op === '~=') {
      try {
        sel.re = new RegExp(value);
      } catch (err) {
        this.error(`invalid regular expression ${JSON.stringify(value)}: ${(err as Error).message}`);
      }
    }
    return sel;
  }

  parse(): Selector[] {
    const all = [this.selector()];
    for (;;) {
      const c = this.peek();
      if (c === '') return all;
      if (c !== ',') this.error(`unexpected input: ${c}`);
      this.pos++;
      all.push(this.selector());
    }
  }
}

function matchSelector(s: Selector, read: FieldReader): boolean {
  const [value, present] = read(s.fieldpath);
  switch (s.operator) {
    case 'present':
      return present;
    case '==':
      return present && value === s.value;
    case '!=':
      return value !== s.value;
    case '~=':
      return s.re!.test(value);
  }
}

/** Parses filter strings (any of them may match); no strings, or an empty one, match everything. */
export function parseFilters(filters: readonly string[]): Filter {
  if (filters.length === 0 || filters.includes('')) return { match: () => true };
  const alternatives = filters.map((f) => new Parser(f).parse());
  return { match: (read) => alternatives.some((sels) => sels.every((s) => matchSelector(s, read))) };
}
