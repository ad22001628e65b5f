/**
 * `make install` / `make uninstall` (scripts/install.sh): the installed gear is self-contained and
 * runs exactly as its systemd unit says.
 *
 * - installs into a temp PREFIX (DESTDIR empty) and checks the tree: launcher, dist/, proto/, the native
 *   addon, production node_modules only, no path back into the checkout;
 * - parses ExecStart= and ExecStartPost= of the installed gear-snapshotter.service, substitutes a temp
 *   root and socket, and runs them with cwd=/, NODE_PATH unset, in a mount namespace where the checkout is
 *   hidden under an empty tmpfs (so nothing can be loaded from it);
 * - a private containerd (1.6 from Debian 12 and 2.1 from the unstable cache, each on its own temp
 *   root and sockets) loads the installed containerd drop-in through an `imports` glob, as the README
 *   tells admins to, and talks to that gear: snapshots ls/prepare/rm;
 * - SIGTERM (the unit's KillSignal) stops gear with exit 0 and removes its socket;
 * - gear-daemon.service's command the same way: the plugin socket answers dockerd's Plugin.Activate;
 * - systemd-analyze verify accepts both units (and rejects a broken one: the check can fail);
 * - a second install over the first keeps an edited config file; DESTDIR staging writes final paths;
 * - `make uninstall` removes everything it installed (an edited config file is kept, and named).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type ChildProcess } from 'node:child_process';
import { appendFileSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { REPO_ROOT } from '../helpers/dockerd.js';
import { pidsReferencing, run, runOk, spawnLogged, stopChild, stopPid, tailFile, unmountUnder, waitFor } from '../helpers/proc.js';
import { UNSTABLE_ROOT } from '../helpers/unstable.js';

const CONTAINERDS = [
  { name: 'containerd 1.6 (Debian 12), config version 2', bin: '/usr/bin/containerd', ctr: '/usr/bin/ctr', version: 2 },
  {
    name: 'containerd 2.1 (unstable cache), config version 3',
    bin: join(UNSTABLE_ROOT, 'usr/bin/containerd'),
    ctr: join(UNSTABLE_ROOT, 'usr/bin/ctr'),
    version: 3,
  },
] as const;

let base: string;
let prefix: string;

function make(target: string, vars: Record<string, string>, timeoutMs = 120_000) {
  return runOk('make', ['-s', '-C', REPO_ROOT, target, ...Object.entries(vars).map(([k, v]) => `${k}=${v}`)], { timeoutMs });
}

/** The environment a systemd unit gives its command: no NODE_PATH, a plain PATH. */
function unitEnv(): NodeJS.ProcessEnv {
  return { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8' };
}

/** `Key=value` lines of one section of a unit file (comments and blank lines dropped). */
function unitKeys(file: string): Map<string, string[]> {
  const keys = new Map<string, string[]>();
  for (const raw of readFileSync(file, 'utf8').split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#') || line.startsWith(';') || line.startsWith('[')) continue;
    const eq = line.indexOf('=');
    const k = line.slice(0, eq);
    keys.set(k, [...(keys.get(k) ?? []), line.slice(eq + 1)]);
  }
  return keys;
}

/** A command line as systemd splits it; ours use no quoting, which this asserts. */
function splitCommand(value: string): string[] {
  expect(value, 'the unit command uses no quotes or specifiers').not.toMatch(/["'\\%]/);
  return value.split(/\s+/).filter(Boolean);
}

/** Files and directories under dir (relative), sorted. */
function listTree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string) => {
    for (const name of readdirSync(d)) {
      const r = rel ? `${rel}/${name}` : name;
      out.push(r);
      const st = lstatSync(join(d, name));
      if (st.isDirectory()) walk(join(d, name), r);
    }
  };
  if (existsSync(dir)) walk(dir, '');
  return out.sort();
}

beforeAll(async () => {
  base = mkdtempSync('/tmp/gear-install-test-');
  prefix = join(base, 'prefix');
  await make('install', { PREFIX: prefix, DESTDIR: '' });
}, 180_000);

afterAll(async () => {
  if (!base) return;
  for (const pid of pidsReferencing(base)) await stopPid(pid, 10_000);
  await unmountUnder(base);
  rmSync(base, { recursive: true, force: true });
});

describe('make install', () => {
  it('installs a self-contained gear: launcher, dist, proto, native addon, production node_modules only', async () => {
    const lib = join(prefix, 'lib/gear');
    for (const f of [
      'bin/gear',
      'lib/gear/gear.mjs',
      'lib/gear/package.json',
      'lib/gear/dist/cli/gear.js',
      'lib/gear/proto/containerd/services/snapshots/v1/snapshots.proto',
      'lib/gear/build/Release/gear_native.node',
      'lib/gear/libexec/wait-socket.cjs',
      'lib/gear/node_modules/commander/package.json',
      'lib/gear/node_modules/@grpc/grpc-js/package.json',
      'lib/systemd/system/gear-snapshotter.service',
      'lib/systemd/system/gear-daemon.service',
      'etc/default/gear',
      'etc/containerd/conf.d/gear.toml',
    ]) {
      expect(existsSync(join(prefix, f)), f).toBe(true);
    }
    // Dev dependencies are not installed.
    for (const dev of ['vitest', 'typescript', 'fast-check', '@types', 'node-addon-api', '.bin']) {
      expect(existsSync(join(lib, 'node_modules', dev)), `node_modules/${dev}`).toBe(false);
    }
    // Root runs this code: as root, all of it is root's, and nothing is writable by group or others.
    const loose = listTree(lib).filter((r) => {
      const st = lstatSync(join(lib, r));
      return !st.isSymbolicLink() && ((process.getuid?.() === 0 && st.uid !== 0) || (st.mode & 0o022) !== 0);
    });
    expect(loose).toEqual([]);
    // No file of the tree is a symlink out of it.
    const links = listTree(lib).filter((r) => lstatSync(join(lib, r)).isSymbolicLink());
    expect(links.filter((r) => !realpathSync(join(lib, r)).startsWith(`${lib}/`))).toEqual([]);

    // Module resolution from the installed CLI reaches the installed node_modules and nothing else that exists.
    const probe = await runOk(
      'node',
      [
        '-e',
        `const m=require('node:module'),fs=require('node:fs');` +
          `const from=${JSON.stringify(join(lib, 'dist/cli'))};` +
          `console.log(JSON.stringify({paths:m._nodeModulePaths(from).filter(p=>fs.existsSync(p)),` +
          `commander:require.resolve('commander',{paths:[from]}),grpc:require.resolve('@grpc/grpc-js',{paths:[from]})}))`,
      ],
      { cwd: '/', env: unitEnv() },
    );
    const res = JSON.parse(probe.stdout) as { paths: string[]; commander: string; grpc: string };
    expect(res.paths).toEqual([join(lib, 'node_modules')]);
    expect(res.commander.startsWith(join(lib, 'node_modules/'))).toBe(true);
    expect(res.grpc.startsWith(join(lib, 'node_modules/'))).toBe(true);

    // The launcher and the units carry the final paths.
    const launcher = readFileSync(join(prefix, 'bin/gear'), 'utf8');
    expect(launcher).toContain(`"${lib}/gear.mjs"`);
    expect(launcher).not.toContain(REPO_ROOT);
    for (const unit of ['gear-snapshotter.service', 'gear-daemon.service']) {
      const text = readFileSync(join(prefix, 'lib/systemd/system', unit), 'utf8');
      expect(text, unit).not.toMatch(/@[A-Z]+@/);
      expect(text, unit).not.toContain(REPO_ROOT);
      expect(text, unit).toContain(`EnvironmentFile=-${prefix}/etc/default/gear`);
    }
    // The settings file changes nothing until edited: comments only.
    const settings = readFileSync(join(prefix, 'etc/default/gear'), 'utf8').split('\n');
    expect(settings.filter((l) => l.trim() && !l.trim().startsWith('#'))).toEqual([]);
  });

  it('the units are what the docs promise, and systemd-analyze verify accepts them', async () => {
    const dir = join(prefix, 'lib/systemd/system');
    const sn = unitKeys(join(dir, 'gear-snapshotter.service'));
    expect(sn.get('Before')).toEqual(['containerd.service']);
    expect(sn.get('ExecStart')).toEqual([`${prefix}/bin/gear snapshotter --root /var/lib/gear --socket /run/gear/snapshotter.sock`]);
    expect(sn.get('RuntimeDirectory')).toEqual(['gear']);
    expect(sn.get('Type')).toEqual(['simple']); // gear does not speak sd_notify
    expect(sn.get('Restart')).toEqual(['on-failure']);
    expect(sn.get('KillMode')).toEqual(['mixed']);
    expect(sn.get('LimitNOFILE')).toEqual(['1048576']);
    const dm = unitKeys(join(dir, 'gear-daemon.service'));
    expect(dm.get('Before')).toEqual(['docker.service']);
    expect(dm.get('ExecStart')).toEqual([`${prefix}/bin/gear daemon --socket /run/docker/plugins/gear.sock`]);
    for (const u of [sn, dm]) {
      for (const k of ['PrivateTmp', 'ProtectSystem', 'ProtectHome', 'PrivateMounts', 'ReadWritePaths', 'TemporaryFileSystem']) {
        expect(u.has(k), `${k}: a private mount namespace would hide gear's mounts from containerd/dockerd`).toBe(false);
      }
    }
    // The drop-in's address is the unit's socket.
    expect(readFileSync(join(prefix, 'etc/containerd/conf.d/gear.toml'), 'utf8')).toContain('address = "/run/gear/snapshotter.sock"');

    const verify = await run('systemd-analyze', ['verify', '--man=no', 'gear-snapshotter.service', 'gear-daemon.service'].map((a) => (a.endsWith('.service') ? join(dir, a) : a)), {
      timeoutMs: 30_000,
    });
    expect(verify.code, verify.stderr).toBe(0);
    expect(verify.stderr.trim()).toBe('');
    // The check can fail: a broken copy is reported.
    const broken = join(base, 'broken.service');
    writeFileSync(broken, readFileSync(join(dir, 'gear-snapshotter.service'), 'utf8').replace('Type=simple', 'Type=simpel').replace(`${prefix}/bin/gear`, `${base}/no-such-gear`));
    const bad = await run('systemd-analyze', ['verify', '--man=no', broken], { timeoutMs: 30_000 });
    expect(bad.stderr).toContain('simpel');
    expect(bad.stderr).toContain('no-such-gear');
  });

  it('the wait helper of ExecStartPost= fails when gear exits before it listens', async () => {
    // A PID that is surely gone: a child we started and reaped.
    const gone = spawnLogged('true', [], join(base, 'true.log'));
    await new Promise((r) => gone.once('exit', r));
    const r = await run('node', [join(prefix, 'lib/gear/libexec/wait-socket.cjs'), join(base, 'never.sock'), String(gone.pid), '20'], {
      timeoutMs: 30_000,
    });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('before it listened');
  });

  for (const ctrd of CONTAINERDS) {
    it(`runs as gear-snapshotter.service's ExecStart says, with the checkout hidden, and ${ctrd.name} uses it through the drop-in`, async () => {
      expect(existsSync(ctrd.bin), `${ctrd.bin} (scripts/install-deps.sh installs it)`).toBe(true);
      const dir = mkdtempSync(join(base, `v${ctrd.version}-`));
      const gearRoot = join(dir, 'gear-root');
      const gearRun = join(dir, 'run-gear'); // stands for RuntimeDirectory=gear (/run/gear)
      mkdirSync(gearRun);
      const socket = join(gearRun, 'snapshotter.sock');
      const unit = unitKeys(join(prefix, 'lib/systemd/system/gear-snapshotter.service'));
      expect(unit.get('RuntimeDirectory')).toEqual(['gear']);

      // ExecStart= with the temp root and socket in place of /var/lib/gear and /run/gear/snapshotter.sock.
      const argv = splitCommand(unit.get('ExecStart')![0]!);
      const rootAt = argv.indexOf('--root');
      const sockAt = argv.indexOf('--socket');
      expect(argv[rootAt + 1]).toBe('/var/lib/gear');
      expect(argv[sockAt + 1]).toBe('/run/gear/snapshotter.sock');
      argv[rootAt + 1] = gearRoot;
      argv[sockAt + 1] = socket;
      // The checkout is covered by an empty tmpfs in gear's own mount namespace: the installed tree
      // must stand alone. (gear's FUSE mount then lives in that namespace too; nothing here needs it.)
      const gearLog = join(dir, 'gear.log');
      const gear: ChildProcess = spawnLogged(
        'unshare',
        ['--mount', '--propagation', 'private', '--', 'sh', '-c', 'mount -t tmpfs -o ro,size=1m gear-hidden "$0" && cd / && exec "$@"', REPO_ROOT, ...argv],
        gearLog,
        unitEnv(),
      );
      let containerd: ChildProcess | undefined;
      try {
        // ExecStartPost=: the wait helper with this socket and $MAINPID (unshare execs: same PID).
        const post = splitCommand(unit.get('ExecStartPost')![0]!).map((a) => (a === '/run/gear/snapshotter.sock' ? socket : a === '$MAINPID' ? String(gear.pid) : a));
        const waited = await run(post[0]!, post.slice(1), { timeoutMs: 120_000, cwd: '/', env: unitEnv() });
        expect(waited.code, `${waited.stderr}\n--- gear log:\n${tailFile(gearLog)}`).toBe(0);
        expect(gear.exitCode).toBe(null);
        // It really ran without the checkout.
        const hidden = readFileSync(`/proc/${gear.pid}/mountinfo`, 'utf8').split('\n').some((l) => l.split(' ')[4] === REPO_ROOT);
        expect(hidden, 'the checkout is hidden in gear’s namespace').toBe(true);
        expect(readFileSync(`/proc/${gear.pid}/cmdline`, 'utf8').split('\0')).toContain(join(prefix, 'lib/gear/gear.mjs'));

        // containerd with the installed drop-in, imported by glob; only the address is the test's socket.
        const confd = join(dir, 'conf.d');
        mkdirSync(confd);
        const dropin = readFileSync(join(prefix, 'etc/containerd/conf.d/gear.toml'), 'utf8');
        expect(dropin).not.toMatch(/^\s*version\s*=/m); // takes the main file's version
        writeFileSync(join(confd, 'gear.toml'), dropin.replace('"/run/gear/snapshotter.sock"', JSON.stringify(socket)));
        const ctrdSocket = join(dir, 'containerd.sock');
        const disabled =
          ctrd.version === 3
            ? '["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox"]'
            : '["io.containerd.grpc.v1.cri"]';
        writeFileSync(
          join(dir, 'config.toml'),
          `version = ${ctrd.version}
imports = ["${confd}/*.toml"]
root = "${dir}/ctrd-root"
state = "${dir}/ctrd-state"
disabled_plugins = ${disabled}

[grpc]
  address = "${ctrdSocket}"

[ttrpc]
  address = "${ctrdSocket}.ttrpc"
`,
        );
        const ctrdLog = join(dir, 'containerd.log');
        containerd = spawnLogged(ctrd.bin, ['--config', join(dir, 'config.toml')], ctrdLog);
        const ctr = (args: string[]) => run(ctrd.ctr, ['--address', ctrdSocket, '--namespace', 'gear-install', ...args], { timeoutMs: 30_000 });
        const up = await waitFor(async () => existsSync(ctrdSocket) && (await ctr(['version'])).code === 0, 60_000, 250);
        expect(up, `containerd did not start:\n${tailFile(ctrdLog)}`).toBe(true);

        const plugins = await ctr(['plugins', 'ls']);
        expect(plugins.stdout).toMatch(/io\.containerd\.snapshotter\.v1\s+gear\s+\S+\s+ok/);
        const ls = await ctr(['snapshots', '--snapshotter', 'gear', 'ls']);
        expect(ls.code, `${ls.stderr}\n--- containerd:\n${tailFile(ctrdLog)}\n--- gear:\n${tailFile(gearLog)}`).toBe(0);
        const prep = await ctr(['snapshots', '--snapshotter', 'gear', 'prepare', 'install-test-1']);
        expect(prep.code, `${prep.stderr}\n--- gear:\n${tailFile(gearLog)}`).toBe(0);
        expect((await ctr(['snapshots', '--snapshotter', 'gear', 'ls'])).stdout).toContain('install-test-1');
        // gear keeps it under the root from ExecStart.
        expect(readdirSync(join(gearRoot, 'snapshotter/snapshots')).length).toBeGreaterThan(0);
        expect((await ctr(['snapshots', '--snapshotter', 'gear', 'rm', 'install-test-1'])).code).toBe(0);

        await stopChild(containerd);
        containerd = undefined;
        // KillSignal=SIGTERM: an orderly stop, exit 0, socket removed.
        const ended = new Promise<number | null>((resolve) => gear.once('exit', (code) => resolve(code)));
        gear.kill('SIGTERM');
        const code = await Promise.race([ended, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 45_000))]);
        expect(code, tailFile(gearLog)).toBe(0);
        expect(existsSync(socket)).toBe(false);
      } finally {
        if (containerd) await stopChild(containerd);
        for (const pid of pidsReferencing(dir)) await stopPid(pid, 10_000);
        if (gear.exitCode === null && gear.signalCode === null) await stopChild(gear);
        await unmountUnder(dir);
      }
    });
  }

  it('runs as gear-daemon.service says (graph-driver plugin socket), with the checkout hidden', async () => {
    const dir = mkdtempSync(join(base, 'daemon-'));
    const socket = join(dir, 'plugins', 'gear.sock'); // stands for /run/docker/plugins/gear.sock
    const unit = unitKeys(join(prefix, 'lib/systemd/system/gear-daemon.service'));
    const argv = splitCommand(unit.get('ExecStart')![0]!);
    const sockAt = argv.indexOf('--socket');
    expect(argv[sockAt + 1]).toBe('/run/docker/plugins/gear.sock');
    argv[sockAt + 1] = socket;
    const log = join(dir, 'gear.log');
    const gear = spawnLogged(
      'unshare',
      ['--mount', '--propagation', 'private', '--', 'sh', '-c', 'mount -t tmpfs -o ro,size=1m gear-hidden "$0" && cd / && exec "$@"', REPO_ROOT, ...argv],
      log,
      unitEnv(),
    );
    try {
      const post = splitCommand(unit.get('ExecStartPost')![0]!).map((a) => (a === '/run/docker/plugins/gear.sock' ? socket : a === '$MAINPID' ? String(gear.pid) : a));
      const waited = await run(post[0]!, post.slice(1), { timeoutMs: 120_000, cwd: '/', env: unitEnv() });
      expect(waited.code, `${waited.stderr}\n--- gear log:\n${tailFile(log)}`).toBe(0);
      // dockerd's first call to a plugin.
      const activate = await new Promise<string>((resolve, reject) => {
        const req = request({ socketPath: socket, path: '/Plugin.Activate', method: 'POST', timeout: 10_000 }, (res) => {
          let body = '';
          res.on('data', (c: Buffer) => (body += c.toString()));
          res.on('end', () => resolve(body));
        });
        req.on('timeout', () => req.destroy(new Error('Plugin.Activate timed out')));
        req.on('error', reject);
        req.end('{}');
      });
      expect(JSON.parse(activate)).toEqual({ Implements: ['GraphDriver'] });
      const ended = new Promise<number | null>((resolve) => gear.once('exit', (code) => resolve(code)));
      gear.kill('SIGTERM');
      const code = await Promise.race([ended, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 45_000))]);
      expect(code, tailFile(log)).toBe(0);
      expect(existsSync(socket)).toBe(false);
    } finally {
      if (gear.exitCode === null && gear.signalCode === null) await stopChild(gear);
    }
  });

  it('a second install keeps an edited config file; DESTDIR stages with final paths', async () => {
    const settings = join(prefix, 'etc/default/gear');
    appendFileSync(settings, 'GEAR_CACHE_SIZE=5GiB\n');
    const again = await make('install', { PREFIX: prefix, DESTDIR: '' });
    expect(again.stderr).toContain(`kept ${settings}`);
    expect(readFileSync(settings, 'utf8')).toContain('GEAR_CACHE_SIZE=5GiB');
    expect(existsSync(join(prefix, 'lib/gear/dist/cli/gear.js'))).toBe(true);
    expect(readdirSync(join(prefix, 'lib')).filter((n) => n.startsWith('.gear'))).toEqual([]); // no staging leftovers

    const stage = join(base, 'stage');
    await make('install', { PREFIX: '/usr', DESTDIR: stage });
    const unit = readFileSync(join(stage, 'usr/lib/systemd/system/gear-snapshotter.service'), 'utf8');
    expect(unit).toContain('ExecStart=/usr/bin/gear snapshotter');
    expect(unit).toContain('EnvironmentFile=-/etc/default/gear');
    expect(unit).not.toContain(stage);
    expect(readFileSync(join(stage, 'usr/bin/gear'), 'utf8')).toContain('"/usr/lib/gear/gear.mjs"');
    expect(existsSync(join(stage, 'etc/containerd/conf.d/gear.toml'))).toBe(true);
    await make('uninstall', { PREFIX: '/usr', DESTDIR: stage });
    expect(listTree(stage)).toEqual([]);
  });

  it('make uninstall removes everything it installed, but keeps (and names) an edited config file', async () => {
    const settings = join(prefix, 'etc/default/gear');
    expect(readFileSync(settings, 'utf8')).toContain('GEAR_CACHE_SIZE=5GiB'); // edited by the previous case
    const r = await make('uninstall', { PREFIX: prefix, DESTDIR: '' });
    expect(r.stderr).toContain(`kept ${settings}`);
    expect(listTree(prefix)).toEqual(['etc', 'etc/default', 'etc/default/gear']);
    // Nothing of the install is left but the admin's file (an unedited one goes: the DESTDIR case above).
    rmSync(prefix, { recursive: true });
  });
});
