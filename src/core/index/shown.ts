/** A short rendering of a hostile JSON value for an error message. */
export function shown(v: unknown): string {
  if (v === undefined) return 'nothing';
  let s: string;
  try {
    s = typeof v === 'number' ? String(v) : (JSON.stringify(v) ?? String(v));
  } catch {
    s = String(v);
  }
  return s.length > 80 ? `${s.slice(0, 80)}…` : s;
}

/**
 * Where an index check is, for its error message. The checks run for every
 * entry of every pulled index and a message is needed only when one fails:
 * a Where is a string, or an object that makes its text when shown.
 */
export type Where = string | Item | Named;

/** `prefix[i]`, made when shown. */
export class Item {
  constructor(
    readonly prefix: string,
    readonly i: number,
  ) {}
  toString(): string {
    return `${this.prefix}[${this.i}]`;
  }
}

/** `where "path"` (the path cut at 200 characters), made when shown. */
export class Named {
  constructor(
    readonly where: Where,
    readonly path: string,
  ) {}
  toString(): string {
    return `${String(this.where)} ${JSON.stringify(this.path.slice(0, 200))}`;
  }
}
