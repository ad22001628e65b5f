import { describe, expect, it } from 'vitest';
import { CommitSlots } from '../../src/core/fetcher/commit-slots.js';

const tick = () => new Promise((r) => setImmediate(r));

describe('commit slots', () => {
  it('background commits take at most their share; a container miss takes the slot left and goes first', async () => {
    const slots = new CommitSlots(4, 3);
    const order: string[] = [];
    const held: Array<() => void> = [];
    const take = (name: string, urgent: boolean) =>
      void slots.take(urgent).then((release) => {
        order.push(name);
        held.push(release);
      });
    for (let i = 0; i < 6; i++) take(`bg${i}`, false);
    await tick();
    expect(order).toEqual(['bg0', 'bg1', 'bg2']);
    expect(slots.inUse).toEqual({ all: 3, background: 3 });
    take('miss1', true);
    take('miss2', true);
    await tick();
    expect(order).toEqual(['bg0', 'bg1', 'bg2', 'miss1']); // the fourth slot; all 4 busy now
    held[0]!(); // a background commit ends: the waiting miss goes before the waiting background ones
    held[0]!(); // idempotent
    await tick();
    expect(order.slice(4)).toEqual(['miss2']);
    expect(slots.inUse).toEqual({ all: 4, background: 2 });
    held[3]!(); // miss1 ends: a background one may take the slot (2 of 3 background running)
    await tick();
    expect(order.slice(5)).toEqual(['bg3']);
    expect(slots.inUse).toEqual({ all: 4, background: 3 });
  });
});
