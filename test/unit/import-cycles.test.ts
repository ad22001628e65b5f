/**
 * No module of src/ imports itself back through others (value imports; type
 * imports vanish at run time). A cycle makes the load order decide which
 * bindings are still undefined when a module body runs, and it means two
 * rooms that should be one, or a third room missing (as index-dir.ts and
 * index-image.ts were before index-entry.ts).
 */
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(import.meta.dirname, '../../src');

function sources(d: string): string[] {
  return fs.readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sources(path.join(d, e.name)) : e.name.endsWith('.ts') ? [path.join(d, e.name)] : []));
}

describe('src/ module graph', () => {
  it('has no import cycle', () => {
    const deps = new Map<string, string[]>();
    for (const f of sources(ROOT)) {
      const text = fs.readFileSync(f, 'utf8');
      const out: string[] = [];
      for (const m of text.matchAll(/^(import|export)\s([^;]*?)from\s+'(\.[^']+)'/gms)) {
        if (/^type\s/.test(m[2]!)) continue; // import type / export type
        out.push(path.resolve(path.dirname(f), m[3]!.replace(/\.js$/, '.ts')));
      }
      deps.set(f, out);
    }
    const state = new Map<string, 'open' | 'done'>();
    const cycles: string[] = [];
    const visit = (f: string, stack: string[]): void => {
      state.set(f, 'open');
      stack.push(f);
      for (const d of deps.get(f) ?? []) {
        if (!deps.has(d)) continue;
        if (state.get(d) === 'open') cycles.push(stack.slice(stack.indexOf(d)).concat(d).map((x) => path.relative(ROOT, x)).join(' → '));
        else if (!state.has(d)) visit(d, stack);
      }
      stack.pop();
      state.set(f, 'done');
    };
    for (const f of deps.keys()) if (!state.has(f)) visit(f, []);
    expect(cycles).toEqual([]);
  });
});
