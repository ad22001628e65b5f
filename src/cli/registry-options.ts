/**
 * The registry mirror options shared by `gear daemon`, `gear snapshotter`,
 * `gear convert`, `gear copy` and `gear prefetch`: a containerd-style hosts
 * directory and Docker Hub mirrors (src/core/registry/hosts.ts, mirrors.ts).
 */
import { existsSync } from 'node:fs';
import { Command, InvalidArgumentError, Option } from 'commander';
import { parseDuration } from '../core/duration.js';
import { DEFAULT_REGISTRY_CONFIG_DIR, dockerHubMirrors } from '../core/registry/hosts.js';
import type { MirrorOptions } from '../core/registry/types.js';

export interface MirrorFlags {
  /** undefined: the default (DEFAULT_REGISTRY_CONFIG_DIR when it exists); '': none. */
  registryConfigDir?: string;
  registryMirror?: string[];
  registryMirrorTimeout?: number;
}

function cliParser<T, P = undefined>(parse: (v: string, previous: P) => T): (v: string, previous: P) => T {
  return (v, previous) => {
    try {
      return parse(v, previous);
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
  };
}

function collectMirrors(value: string, previous: string[] | undefined): string[] {
  const list = [...(previous ?? []), ...value.split(',').map((s) => s.trim()).filter(Boolean)];
  dockerHubMirrors(list); // refuse a bad URL now, naming it
  return list;
}

/** Adds --registry-config-dir, --registry-mirror and --registry-mirror-timeout. */
export function addMirrorOptions(cmd: Command): Command {
  for (const o of mirrorOptions()) cmd.addOption(o);
  return cmd;
}

/** The options --registry-config-dir, --registry-mirror and --registry-mirror-timeout. */
export function mirrorOptions(): Option[] {
  return [
    new Option(
      '--registry-config-dir <dir>',
      `registry mirrors per registry, containerd's hosts.toml layout (<dir>/<host[:port]>/hosts.toml, <dir>/_default/hosts.toml); '' for none (default: ${DEFAULT_REGISTRY_CONFIG_DIR} when it exists)`,
    ).env('GEAR_REGISTRY_CONFIG_DIR'),
    new Option('--registry-mirror <url>', "a Docker Hub mirror, as Docker's registry-mirrors (repeatable or comma separated; tried in order before docker.io)")
      .env('GEAR_REGISTRY_MIRRORS')
      .argParser(cliParser(collectMirrors)),
    new Option('--registry-mirror-timeout <duration>', 'longest wait for a mirror to answer before the next host is tried (default 5s)')
      .env('GEAR_REGISTRY_MIRROR_TIMEOUT')
      .argParser(cliParser((v: string): number => parseDuration(v, 'registry mirror timeout')) as (v: string) => number),
  ];
}

/** The registry client's `mirrors` option from the flags. */
export function mirrorOptionsFrom(f: MirrorFlags): MirrorOptions {
  const dir = f.registryConfigDir ?? (existsSync(DEFAULT_REGISTRY_CONFIG_DIR) ? DEFAULT_REGISTRY_CONFIG_DIR : '');
  const out: MirrorOptions = {};
  if (dir) out.configDir = dir;
  if (f.registryMirror?.length) out.dockerHubMirrors = f.registryMirror;
  if (f.registryMirrorTimeout !== undefined) out.mirrorTimeoutMs = f.registryMirrorTimeout;
  return out;
}
