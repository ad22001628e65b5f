/**
 * A shaped link for the cold-deploy benchmark: a network namespace we create,
 * joined to the root namespace by a veth pair with a private /30 that no
 * existing route covers; tc tbf on each end's egress (ns side = download to
 * the node, host side = upload). Everything is removed by destroy().
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { run, runOk } from '../../test/helpers/proc.js';

export interface Shape {
  /** e.g. '100mbit'; undefined = no qdisc (veth at full speed). */
  down?: string;
  up?: string;
}

export class ShapedLink {
  readonly ns: string;
  readonly hostIf: string;
  readonly nsIf: string;
  hostAddr = '';
  nsAddr = '';
  private created = { ns: false, link: false };

  constructor() {
    const tag = randomBytes(3).toString('hex');
    this.ns = `gearbench-${tag}`;
    this.hostIf = `gbh${tag}`;
    this.nsIf = `gbn${tag}`;
  }

  /** A 10.x.y.0/30 that neither an address nor a route of the root namespace touches. */
  private async pickSubnet(): Promise<[string, string]> {
    const routes = (await runOk('ip', ['-4', 'route', 'show', 'table', 'all'])).stdout + (await runOk('ip', ['-4', 'addr'])).stdout;
    for (let i = 0; i < 50; i++) {
      const b = 200 + Math.floor(Math.random() * 50);
      const c = Math.floor(Math.random() * 64) * 4;
      const prefix = `10.${b}.`;
      if (routes.includes(prefix) || /\b10\.0\.0\.0\/8\b/.test(routes)) continue;
      return [`10.${b}.0.${c + 1}`, `10.${b}.0.${c + 2}`];
    }
    throw new Error('no free private /30 found');
  }

  async create(): Promise<void> {
    [this.hostAddr, this.nsAddr] = await this.pickSubnet();
    await runOk('ip', ['netns', 'add', this.ns]);
    this.created.ns = true;
    await runOk('ip', ['link', 'add', this.hostIf, 'type', 'veth', 'peer', 'name', this.nsIf]);
    this.created.link = true;
    await runOk('ip', ['link', 'set', this.nsIf, 'netns', this.ns]);
    await runOk('ip', ['addr', 'add', `${this.hostAddr}/30`, 'dev', this.hostIf]);
    await runOk('ip', ['link', 'set', this.hostIf, 'up']);
    const nsx = (args: string[]) => runOk('ip', ['netns', 'exec', this.ns, ...args]);
    await nsx(['ip', 'addr', 'add', `${this.nsAddr}/30`, 'dev', this.nsIf]);
    await nsx(['ip', 'link', 'set', this.nsIf, 'up']);
    await nsx(['ip', 'link', 'set', 'lo', 'up']);
  }

  /** Sets (or clears) the tbf shaping of both directions. */
  async shape(s: Shape): Promise<void> {
    const apply = async (prefix: string[], dev: string, rate?: string) => {
      await run(...cmd(prefix, ['tc', 'qdisc', 'del', 'dev', dev, 'root']));
      if (rate) await runOk(...cmd(prefix, ['tc', 'qdisc', 'add', 'dev', dev, 'root', 'tbf', 'rate', rate, 'burst', '256kb', 'latency', '50ms']));
    };
    const cmd = (prefix: string[], args: string[]): [string, string[]] =>
      prefix.length ? [prefix[0]!, [...prefix.slice(1), ...args]] : [args[0]!, args.slice(1)];
    await apply(['ip', 'netns', 'exec', this.ns], this.nsIf, s.down);
    await apply([], this.hostIf, s.up);
  }

  /** Bytes the root namespace received over the link (ns -> node), IP headers included. */
  rxBytes(): number {
    return Number(readFileSync(`/sys/class/net/${this.hostIf}/statistics/rx_bytes`, 'utf8').trim());
  }

  txBytes(): number {
    return Number(readFileSync(`/sys/class/net/${this.hostIf}/statistics/tx_bytes`, 'utf8').trim());
  }

  async qdiscs(): Promise<string> {
    const a = await run('tc', ['qdisc', 'show', 'dev', this.hostIf]);
    const b = await run('ip', ['netns', 'exec', this.ns, 'tc', 'qdisc', 'show', 'dev', this.nsIf]);
    return `${this.hostIf}: ${a.stdout.trim()} | ${this.nsIf}: ${b.stdout.trim()}`;
  }

  async destroy(): Promise<void> {
    if (this.created.link) await run('ip', ['link', 'del', this.hostIf]);
    this.created.link = false;
    if (this.created.ns) await run('ip', ['netns', 'del', this.ns]);
    this.created.ns = false;
  }
}

let loSeq = 0;

/**
 * Runs fn with the path of a fresh network namespace that holds only a
 * loopback that is up (what `docker run --network none` gives a container;
 * runc leaves a new namespace's lo down), for `ctr run --with-ns network:PATH`.
 * The namespace is deleted afterwards.
 */
export async function withLoopbackNetns<T>(fn: (path: string) => Promise<T>): Promise<T> {
  const ns = `gblo-${process.pid}-${++loSeq}`;
  await runOk('ip', ['netns', 'add', ns]);
  try {
    await runOk('ip', ['netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up']);
    return await fn(`/run/netns/${ns}`);
  } finally {
    await run('ip', ['netns', 'del', ns]);
  }
}
