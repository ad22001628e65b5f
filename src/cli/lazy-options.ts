/**
 * The lazy-pull options shared by `gear daemon` and `gear snapshotter`: the
 * same flags, the same environment variables, the same LazyOptions.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { parseDuration } from '../core/duration.js';
import { FUSE_OPEN_MODES, type FuseOpenMode, type LazyOptions } from '../core/lazy/runtime.js';
import { parseMetricsAddress } from '../core/metrics/server.js';
import { parseScrubInterval, parseScrubRate } from '../core/pool/scrubber.js';
import type { LayerStoreOptions } from '../core/layers/store.js';
import { addMirrorOptions, mirrorOptionsFrom, type MirrorFlags } from './registry-options.js';
import { parseRequireLazy, REQUIRE_LAZY_ENV } from '../core/stats/nonlazy.js';

export interface LazyFlags extends MirrorFlags {
  lazy: boolean;
  cacheSize?: string;
  fetchTimeout?: number;
  maxFetches?: number;
  insecureRegistry: string[];
  fusePassthrough: boolean;
  fuseOpen?: FuseOpenMode;
  backgroundFetch?: boolean;
  scrubRate?: number;
  scrubInterval?: number;
  metricsAddress?: string;
  requireLazy?: boolean;
}

/** A commander argParser from a parser that throws GearErrors (their message becomes the CLI error). */
export function cliParser<T>(parse: (v: string) => T): (v: string) => T {
  return (v) => {
    try {
      return parse(v);
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
  };
}

function parsePositiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) throw new InvalidArgumentError('expected a positive integer');
  return n;
}

function collectRegistries(value: string, previous: string[]): string[] {
  return [...previous, ...value.split(',').map((s) => s.trim()).filter(Boolean)];
}

/**
 * Adds --no-lazy, --cache-size, --fetch-timeout, --max-fetches, --insecure-registry, the registry mirror options
 * (registry-options.ts), --no-fuse-passthrough, --fuse-open, --background-fetch, --scrub-rate, --scrub-interval, --metrics-address and --require-lazy.
 */
export function addLazyOptions(cmd: Command): Command {
  return addMirrorOptions(cmd
    .addOption(new Option('--no-lazy', 'do not mount the miss filesystem (Gear files then come only from the pool)'))
    .addOption(new Option('--cache-size <size>', 'cap of the Gear file pool, e.g. 20GiB (default: previous run\'s, else 20GiB)').env('GEAR_CACHE_SIZE'))
    .addOption(
      new Option('--fetch-timeout <duration>', 'deadline of a lazy fetch; a reader then gets EIO (e.g. 60s, 500ms)')
        .env('GEAR_FETCH_TIMEOUT')
        .argParser(cliParser((v) => parseDuration(v, 'fetch timeout'))),
    )
    .addOption(new Option('--max-fetches <n>', 'lazy downloads in flight at most (default 8)').env('GEAR_MAX_FETCHES').argParser(parsePositiveInt))
    .addOption(
      new Option('--insecure-registry <host[:port]>', 'registry reachable over plain http (repeatable; loopback always is)')
        .env('GEAR_INSECURE_REGISTRIES')
        .argParser(collectRegistries)
        .default([]),
    ))
    .addOption(
      new Option(
        '--no-fuse-passthrough',
        'with --fuse-open passthrough: serve reads of fetched files through the daemon instead of FUSE passthrough (needed when containers stack another overlay on their root filesystem)',
      ),
    )
    .addOption(
      new Option(
        '--fuse-open <mode>',
        'none (default): no request per open of a Gear file, the kernel keeps file pages cached across opens (reads again at page-cache speed; first reads of pages go through the daemon); passthrough: one request to the daemon per open, reads of fetched files in the kernel',
      )
        .choices(FUSE_OPEN_MODES)
        .env('GEAR_FUSE_OPEN'),
    )
    .addOption(
      // Not .env() (see --require-lazy): the runtime reads GEAR_BACKGROUND_FETCH=on|off itself.
      new Option(
        '--background-fetch',
        'complete each Gear image into the cache at low priority once containers stop missing, within the cache cap and never evicting for it (env GEAR_BACKGROUND_FETCH=on); off by default: only opened files are fetched',
      ),
    )
    .addOption(
      new Option('--scrub-rate <size>', 'read rate of the pool scrub, per second (default 50MiB)').env('GEAR_SCRUB_RATE').argParser(cliParser((v) => parseScrubRate(v))),
    )
    .addOption(
      new Option('--scrub-interval <duration>', 'time between pool scrubs that re-hash every cached file (default 24h; 0 = off)')
        .env('GEAR_SCRUB_INTERVAL')
        .argParser(cliParser((v) => parseScrubInterval(v))),
    )
    .addOption(
      new Option('--metrics-address <host:port>', 'serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9495; :9495 for all interfaces)')
        .env('GEAR_METRICS_ADDRESS')
        .argParser(
          cliParser((v): string | undefined => {
            if (v.trim() === '') return undefined; // an empty setting (the managed plugin's default) is off
            parseMetricsAddress(v);
            return v;
          }),
        ),
    )
    .addOption(
      // Not .env(): commander turns a boolean flag on whenever its variable is set, even to "false".
      new Option(
        '--require-lazy',
        `refuse containers on images that are not Gear images, naming the image and the remedy (env ${REQUIRE_LAZY_ENV}=true); without it they are counted and warned about`,
      ),
    );
}

/** --require-lazy, else GEAR_REQUIRE_LAZY (true/false, 1/0, yes/no, on/off). */
export function requireLazyFrom(f: LazyFlags): boolean {
  if (f.requireLazy) return true;
  try {
    return parseRequireLazy(process.env[REQUIRE_LAZY_ENV]);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** The store's `lazy` option from the flags (registry credentials: $DOCKER_CONFIG, else ~/.docker/config.json). */
export function lazyStoreOption(f: LazyFlags): false | LazyOptions {
  if (!f.lazy) return false;
  return {
    ...(f.cacheSize ? { cacheSize: f.cacheSize } : {}),
    ...(f.fetchTimeout ? { fetchTimeoutMs: f.fetchTimeout } : {}),
    ...(f.maxFetches ? { maxFetches: f.maxFetches } : {}),
    insecureRegistries: f.insecureRegistry,
    mirrors: mirrorOptionsFrom(f),
    fusePassthrough: f.fusePassthrough,
    ...(f.fuseOpen ? { fuseOpen: f.fuseOpen } : {}),
    ...(f.backgroundFetch ? { backgroundFetch: true } : {}),
    ...(f.scrubRate !== undefined ? { scrubRate: f.scrubRate } : {}),
    ...(f.scrubInterval !== undefined ? { scrubInterval: f.scrubInterval } : {}),
  };
}

/** The layer store's options from the shared flags: lazy machinery and metrics. */
export function storeOptionsFrom(f: LazyFlags): Pick<LayerStoreOptions, 'lazy' | 'metricsAddress' | 'requireLazy'> {
  return { lazy: lazyStoreOption(f), ...(f.metricsAddress ? { metricsAddress: f.metricsAddress } : {}), requireLazy: requireLazyFrom(f) };
}
