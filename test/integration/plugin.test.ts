/**
 * The managed Docker plugin end to end (issue 4), with Debian's dockerd 20.10
 * and a real registry:
 *
 * - plugin/build.sh builds the bundle from this machine's node, util-linux
 *   mount and busybox, and runs `docker plugin create` against a private dockerd;
 * - `docker plugin set` (cache size, log level, credentials home mount), enable
 *   (on the second dockerd with the default mount source, whatever /root/.docker is),
 *   restart dockerd with `--experimental -s gear`: the cache size set is the one
 *   in force (driver Status in `docker info`);
 * - ordinary images: push/pull/run, and a layer needing the default capability
 *   set (device node, whiteouts, opaque dir, setuid file of another owner,
 *   security.capability xattr) on a plugin that adds only CAP_SYS_ADMIN;
 * - dockerd restart with a running container;
 * - `docker plugin push` to the registry, `docker plugin install` on a second dockerd;
 * - a Gear (lazy) image converted with `gear convert docker-daemon:` runs through
 *   the installed plugin and fetches only the files it touches;
 * - disabling the plugin while dockerd uses it fails at once with a clear error.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StatsReport } from '../../src/core/stats/report.js';
import { DOCKER_BIN, DOCKERD_BIN, GEAR_CLI } from '../helpers/dockerd.js';
import { driverStatus, inspectPlugin, PLUGIN_BUILD, pluginPids, startPrivateDockerd, type PrivateDockerd } from '../helpers/managed-plugin.js';
import { pack as tarPack } from 'tar-stream';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startFaultProxy, type FaultProxy } from '../helpers/proxy.js';
import { REGISTRY_BINARY, startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
const PLUGIN = 'gear';
const SERVE = ['--experimental', '-s', PLUGIN];

const prerequisites = [DOCKER_BIN, DOCKERD_BIN, REGISTRY_BINARY, GEAR_CLI, '/dev/fuse', '/bin/busybox'].filter((p) => !existsSync(p));
const canRun = process.getuid?.() === 0 && prerequisites.length === 0;

let reg: TestRegistry;
let proxy: FaultProxy;
let work: string;
let bundle: string;
let creds: string;
let A: PrivateDockerd | undefined;
let B: PrivateDockerd | undefined;

/** Capability bits of a process (CapEff from /proc/PID/status). */
function capEff(pid: number): bigint {
  const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return BigInt(`0x${m?.[1] ?? '0'}`);
}

// A layer whose extraction needs more than CAP_SYS_ADMIN: the default managed
// plugin capability set (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, MKNOD, SETFCAP) covers it.
const capValue = '\x01\x00\x00\x02\x00\x20\x00\x00' + '\x00'.repeat(12); // VFS_CAP_REVISION_2|EFFECTIVE, permitted = CAP_NET_RAW
const special: (LayerEntry[] | Buffer)[] = [
  [
    { path: 'special/', type: 'dir' },
    { path: 'special/gone', content: 'deleted by the next layer\n' },
    { path: 'special/opaque/', type: 'dir' },
    { path: 'special/opaque/old', content: 'hidden by an opaque dir\n' },
  ],
  [
    { path: 'special/', type: 'dir' },
    { path: 'special/.wh.gone', content: '' },
    { path: 'special/opaque/', type: 'dir' },
    { path: 'special/opaque/.wh..wh..opq', content: '' },
    { path: 'special/opaque/new', content: 'new\n' },
    { path: 'special/suid', content: '#!/bin/sh\n', mode: 0o4755, uid: 1000, gid: 1000 },
    { path: 'special/private', type: 'dir', mode: 0o700, uid: 1000, gid: 1000 },
    { path: 'special/private/secret', content: 'secret\n', mode: 0o600, uid: 1000, gid: 1000 },
    { path: 'special/capfile', content: 'cap\n', mode: 0o755, pax: { 'SCHILY.xattr.security.capability': capValue } },
  ],
];

/** A layer holding one character device (1, 3) at special/null (layerTar cannot set device numbers). */
async function deviceLayer(): Promise<Buffer> {
  const p = tarPack();
  const parts: Buffer[] = [];
  p.on('data', (c: unknown) => parts.push(c as Buffer));
  const done = new Promise<void>((resolve, reject) => {
    p.on('end', resolve);
    p.on('error', reject);
  });
  p.entry({ name: 'special/', type: 'directory', mode: 0o755, mtime: new Date(1_700_000_000_000) });
  p.entry({ name: 'special/null', type: 'character-device', mode: 0o666, devmajor: 1, devminor: 3, mtime: new Date(1_700_000_000_000) });
  p.finalize();
  await done;
  return Buffer.concat(parts);
}

describe.skipIf(!canRun)('managed Docker plugin', () => {
  beforeAll(async () => {
    work = mkdtempSync('/tmp/gear-plugin-it-');
    bundle = join(work, 'bundle');
    creds = join(work, 'home');
    mkdirSync(join(creds, '.docker'), { recursive: true });
    writeFileSync(join(creds, '.docker', 'config.json'), '{"auths":{}}\n');
    reg = await startRegistry();
    proxy = await startFaultProxy(reg.url);
    A = await startPrivateDockerd();
  });

  afterAll(async () => {
    await B?.stop();
    await A?.stop();
    await proxy?.stop();
    await reg?.stop();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  it('plugin/build.sh builds a small bundle and creates the plugin on the given dockerd', async () => {
    const r = await runOk('bash', [PLUGIN_BUILD, '--out', bundle, '--name', PLUGIN], {
      timeoutMs: 600_000,
      env: { ...A!.clientEnv(), DOCKER: DOCKER_BIN },
    });
    expect(r.stderr).toMatch(/rootfs \d+/);
    const p = await inspectPlugin(A!, PLUGIN);
    expect(p.Enabled).toBe(false);
    expect(p.Config).toMatchObject({ Interface: { Types: ['docker.graphdriver/1.0'], Socket: 'gear.sock' }, PropagatedMount: '/var/lib/gear' });
  });

  it('docker plugin set + enable; dockerd -s gear runs with the cache size that was set', async () => {
    await A!.dockerOk(['plugin', 'set', PLUGIN, 'GEAR_CACHE_SIZE=321MiB', 'GEAR_LOG_LEVEL=debug', `home.source=${creds}`]);
    const p = await inspectPlugin(A!, PLUGIN);
    expect(p.Settings.Env).toContain('GEAR_CACHE_SIZE=321MiB');
    await A!.dockerOk(['plugin', 'enable', '--timeout', '60', PLUGIN], { timeoutMs: 90_000 });
    await A!.restartWith(SERVE);
    const info = await A!.dockerOk(['info', '--format', '{{.Driver}}']);
    expect(info.stdout.trim()).toBe(PLUGIN);
    const st = await driverStatus(A!);
    expect(st['Pool']).toMatch(/ of 321\.0 MiB$/);
    expect(st['Lazy Pull']).toMatch(/^on/);
    expect(st['Root']).toBe('/var/lib/gear/store');
    // The plugin adds only CAP_SYS_ADMIN; the rest comes from the default set.
    const pid = pluginPids(A!)[0];
    expect(pid).toBeDefined();
    // The home mount: the plugin sees the credentials file at /root/.docker/config.json.
    expect(readFileSync(`/proc/${pid}/root/root/.docker/config.json`, 'utf8')).toBe('{"auths":{}}\n');
    const caps = capEff(pid!);
    for (const bit of [0, 1, 3, 4, 21, 27, 31]) expect((caps >> BigInt(bit)) & 1n, `capability bit ${bit}`).toBe(1n);
  });

  it('pushes, pulls and runs an ordinary image through the plugin', async () => {
    const tar = join(work, 'bb.tar');
    await writeDockerArchive(tar, [await busyboxLayer()], 'gear-test/busybox:latest');
    await A!.dockerOk(['load', '-i', tar]);
    const ref = `${reg.host}/gear-test/busybox:latest`;
    await A!.dockerOk(['tag', 'gear-test/busybox:latest', ref]);
    await A!.dockerOk(['push', ref]);
    await A!.dockerOk(['rmi', ref, 'gear-test/busybox:latest']);
    await A!.dockerOk(['pull', ref]);
    const r = await A!.dockerOk(['run', '--rm', ref, 'sh', '-c', 'echo hi > /tmp/x && cat /tmp/x /etc/passwd']);
    expect(r.stdout).toBe('hi\nroot:x:0:0:root:/root:/bin/sh\n');
  });

  it('applies layers with device nodes, whiteouts, foreign owners, setuid and security.capability', async () => {
    const tar = join(work, 'special.tar');
    await writeDockerArchive(tar, [await busyboxLayer(), ...special, await deviceLayer()], 'gear-test/special:latest');
    await A!.dockerOk(['load', '-i', tar]);
    const r = await A!.dockerOk([
      'run', '--rm', 'gear-test/special:latest', 'sh', '-c',
      'ls -ln /special | sed 1d | while read m l u g rest; do echo "$m $u $g ${rest##* }"; done; ls /special/opaque; cat /special/null; cat /special/private/secret',
    ]);
    const lines = r.stdout.trim().split('\n');
    expect(lines).toContain('-rwxr-xr-x 0 0 capfile');
    expect(lines).toContain('crw-rw-rw- 0 0 null');
    expect(lines).toContain('-rwsr-xr-x 1000 1000 suid');
    expect(lines).toContain('drwx------ 1000 1000 private');
    expect(lines).toContain('new');
    expect(lines).not.toContain('old');
    expect(r.stdout).not.toMatch(/gone/);
    expect(lines.at(-1)).toBe('secret');
    // security.capability was written (CAP_SETFCAP): read it from the layer on the host.
    const found = await runOk('find', [join(A!.dataRoot, 'plugins'), '-path', '*/diff/special/capfile']);
    const file = found.stdout.trim().split('\n')[0]!;
    expect(file).not.toBe('');
    const cap = await runOk('getcap', [file]);
    expect(cap.stdout).toMatch(/cap_net_raw[=+]ep/);
  });

  it('a running container survives a dockerd restart (restart policy) with its writable layer', async () => {
    const ref = `${reg.host}/gear-test/busybox:latest`;
    const id = (await A!.dockerOk(['run', '-d', '--restart', 'always', ref, 'sh', '-c', 'test -f /kept || echo kept > /kept; exec sleep 100000'])).stdout.trim();
    expect(await waitFor(async () => (await A!.docker(['exec', id, 'cat', '/kept'])).stdout === 'kept\n', 30_000, 500)).toBe(true);
    const layersBefore = (await driverStatus(A!))['Layers'];
    await A!.restartWith(SERVE);
    expect(await waitFor(async () => (await A!.docker(['inspect', '-f', '{{.State.Running}}', id])).stdout.trim() === 'true', 60_000, 500)).toBe(true);
    expect((await A!.dockerOk(['exec', id, 'cat', '/kept'])).stdout).toBe('kept\n');
    expect((await driverStatus(A!))['Layers']).toBe(layersBefore);
    expect((await driverStatus(A!))['Pool']).toMatch(/ of 321\.0 MiB$/);
    await A!.dockerOk(['rm', '-f', id]);
  });

  it('docker plugin push to a registry, docker plugin install on a second dockerd, which then runs images', async () => {
    const pref = `${reg.host}/gear-test/gear-plugin:test`;
    // dockerd 20.10 refuses a second create of a byte-identical rootfs ("content … already exists").
    writeFileSync(join(bundle, 'rootfs/etc/gear-plugin-ref'), `${pref}\n`);
    await A!.dockerOk(['plugin', 'create', pref, bundle], { timeoutMs: 300_000 });
    await A!.dockerOk(['plugin', 'push', pref], { timeoutMs: 300_000 });
    B = await startPrivateDockerd();
    await B.dockerOk(['plugin', 'install', '--grant-all-permissions', '--disable', '--alias', PLUGIN, pref], { timeoutMs: 300_000 });
    // No credentials setting: the default mount source (/root) exists on every host, with or without
    // /root/.docker (absent on the test machine), so enable needs no `mkdir -p /root/.docker` first.
    await B.dockerOk(['plugin', 'set', PLUGIN, 'GEAR_CACHE_SIZE=64MiB']);
    expect((await inspectPlugin(B, PLUGIN)).Settings.Mounts).toEqual([expect.objectContaining({ Name: 'home', Source: '/root' })]);
    await B.dockerOk(['plugin', 'enable', '--timeout', '60', PLUGIN], { timeoutMs: 90_000 });
    await B.restartWith(SERVE);
    expect((await driverStatus(B))['Pool']).toMatch(/ of 64\.0 MiB$/);
    const ref = `${reg.host}/gear-test/busybox:latest`;
    await B.dockerOk(['pull', ref]);
    expect((await B.dockerOk(['run', '--rm', ref, 'echo', 'second host'])).stdout).toBe('second host\n');
  });

  it('a Gear image (gear convert docker-daemon:) runs through the installed plugin and fetches only the files it reads', async () => {
    const touched = randomBytes(200_000);
    const untouched = randomBytes(200_000);
    const tar = join(work, 'lazy.tar');
    await writeDockerArchive(tar, [await busyboxLayer(), [{ path: 'data/', type: 'dir' }, { path: 'data/touched', content: touched }, { path: 'data/untouched', content: untouched }]], 'gear-test/lazy-src:latest');
    await A!.dockerOk(['load', '-i', tar]);
    const gearRef = `${proxy.host}/gear-test/lazy:gear`;
    await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', '--docker-host', A!.host, 'docker-daemon:gear-test/lazy-src:latest', gearRef], {
      timeoutMs: 600_000,
    });
    const gets = (b: Buffer) => proxy.seen.filter((l) => l.startsWith('GET ') && l.includes(hex(b))).length;
    const before = { t: gets(touched), u: gets(untouched) };
    await B!.dockerOk(['pull', gearRef]);
    expect((await driverStatus(B!))['Index Layers']).toBe('1');
    const r = await B!.dockerOk(['run', '--rm', gearRef, 'sha256sum', '/data/touched']);
    expect(r.stdout.split(' ')[0]).toBe(hex(touched));
    expect(gets(touched) - before.t).toBeGreaterThanOrEqual(1);
    expect(gets(untouched) - before.u).toBe(0);
    const st = await driverStatus(B!);
    expect(Number(st['Fetched Files'])).toBeGreaterThanOrEqual(1);
    // gear stats from the host reaches the plugin's control socket in its propagated mount, whose path is longer
    // than a unix socket path may be (it goes through a descriptor of the directory).
    expect(st['Control Socket']).toBe('/var/lib/gear/store/gear-control.sock');
    const id = (await inspectPlugin(B!, PLUGIN)).Id;
    const mount = join(B!.dataRoot, 'plugins', id, 'propagated-mount');
    expect(join(mount, 'store/gear-control.sock').length).toBeGreaterThan(107);
    const stats = JSON.parse((await runOk(process.execPath, [GEAR_CLI, 'stats', '--root', mount, '--json'], { timeoutMs: 60_000 })).stdout) as StatsReport;
    expect(stats.layers).toHaveLength(1);
    expect(stats.layers[0]!.fromRegistry.files).toBe(Number(st['Fetched Files']));
    expect(stats.layers[0]!.fromRegistry.bytes).toBeGreaterThanOrEqual(touched.length);
    // The ordinary busybox of the test before ran on this dockerd: one non-Gear container.
    expect(stats.nonLazy.started).toBe(1);
    expect(st['Non-Gear Containers']).toMatch(/^1 started, 0 refused/);
  });

  it('disabling the plugin while dockerd uses it fails at once with a clear error', async () => {
    const t0 = Date.now();
    const r = await A!.docker(['plugin', 'disable', PLUGIN], { timeoutMs: 60_000 });
    expect(r.timedOut).toBe(false);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/in use/);
    expect(Date.now() - t0).toBeLessThan(30_000);
    // dockerd still works on it.
    expect((await A!.dockerOk(['run', '--rm', `${reg.host}/gear-test/busybox:latest`, 'true'])).code).toBe(0);
    expect((await inspectPlugin(A!, PLUGIN)).Enabled).toBe(true);
  });
});

if (!canRun) {
  describe('managed Docker plugin', () => {
    it.skip(`needs root and ${prerequisites.join(', ') || 'nothing else'}`, () => {});
  });
}

