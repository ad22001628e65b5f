/**
 * `gear stats [--root DIR] [--json]`: what the running daemon (`gear daemon`
 * or `gear snapshotter`) serving a Gear root has done, asked over its control
 * socket (ROOT/gear-control.sock): per Gear index layer and per container,
 * files and bytes of the total in the pool, downloaded from the registry,
 * needed by containers and found in the pool; prefetch state; containers on
 * non-Gear images. docs/operations.md explains each column.
 */
import { Command, Option } from 'commander';
import { controlGet } from '../core/control/client.js';
import { formatSize } from '../core/pool/size.js';
import type { Amount, StatsReport } from '../core/stats/report.js';
import { DEFAULT_ROOT } from './cache.js';
import { holdsPool, resolveGearRoot } from './pool-root.js';

function amt(a: Amount, of?: Amount): string {
  const files = of ? `${a.files}/${of.files}` : String(a.files);
  return `${files} (${formatSize(a.bytes)})`;
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => rows.reduce((w, r) => Math.max(w, r[i]!.length), 0));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

export function formatStats(r: StatsReport): string {
  const out: string[] = [];
  out.push(`Root: ${r.root}   counting since ${new Date(r.since).toISOString()}   lazy pull: ${r.lazy ? 'on' : 'off'}`);
  out.push(
    `Pool: ${amt(r.totals.pool)}   from registry: ${amt(r.totals.fromRegistry)}   containers' needs: ${r.totals.neededFromRegistry.files} from registry, ${r.totals.neededFromPool.files} from pool   fetch failures: ${r.totals.fetchFailures}`,
  );
  out.push('');
  if (r.layers.length === 0) out.push('No Gear index layers on this node.');
  else {
    const rows = [['INDEX LAYER', 'SOURCE', 'FILES', 'IN POOL', 'FROM REGISTRY', 'NEEDED: REGISTRY', 'NEEDED: POOL', 'PREFETCH', 'CONTAINERS']];
    for (const l of r.layers) {
      const p = l.prefetch;
      const prefetch = p.state === 'none' ? '-' : `${p.state} ${p.cached + p.fetched}/${p.listed}${p.failed ? ` ${p.failed} failed` : ''}${p.skipped ? ` ${p.skipped} skipped` : ''}`;
      rows.push([
        l.id.slice(0, 12),
        l.location ?? '-',
        amt(l.total),
        amt(l.inPool, l.total),
        amt(l.fromRegistry, l.total),
        amt(l.neededFromRegistry),
        amt(l.neededFromPool),
        prefetch,
        String(l.containers),
      ]);
    }
    out.push(table(rows));
  }
  if (r.containers.length > 0) {
    out.push('');
    const rows = [['CONTAINER', 'INDEX LAYER', 'FETCHED FOR IT', 'FOUND IN POOL']];
    for (const c of r.containers) rows.push([c.name ? c.name.slice(0, 32) : c.id.slice(0, 12), c.indexLayer.slice(0, 12), amt(c.fromRegistry), amt(c.fromPool)]);
    out.push(table(rows));
  }
  out.push('');
  const n = r.nonLazy;
  out.push(
    `Non-Gear containers: ${n.started} started, ${n.refused} refused (--require-lazy ${n.requireLazy ? 'on' : 'off'})` +
      (n.last ? `; last: ${n.last.id} on ${n.last.image || 'an empty root'} at ${new Date(n.last.at).toISOString()}` : ''),
  );
  for (const note of r.notes) out.push(`Note: ${note}`);
  return `${out.join('\n')}\n`;
}

export function registerStats(program: Command): void {
  program
    .command('stats')
    .description("per Gear image and container: files fetched from the pool and from the registry, prefetch state (asks the running daemon)")
    .addOption(new Option('--root <dir>', 'the Gear root the daemon serves (the managed plugin\'s propagated-mount is followed)').env('GEAR_ROOT').default(DEFAULT_ROOT))
    .option('--json', 'print the report as JSON')
    .action(async (opts: { root: string; json?: boolean }) => {
      // A root without a pool may still be a daemon's (lazy pull off): only follow the plugin's directories when it has none.
      const root = holdsPool(opts.root) ? opts.root : resolveGearRoot(opts.root).root;
      const report = await controlGet<StatsReport>(root, '/v1/stats');
      process.stdout.write(opts.json ? `${JSON.stringify(report, null, 2)}\n` : formatStats(report));
    });
}
