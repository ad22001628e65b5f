/**
 * Crash resume end to end (issue 6 items 6 and 8): a container runs from a
 * lazy Gear image on a gear dockerd, the gear daemon is killed with SIGKILL,
 * and restarted on the same root and plugin socket while the container keeps
 * running. The container's overlay still points at the dead miss filesystem
 * of the first daemon; the restarted daemon completes the Gear files of the
 * mounted index into the pool in the background, and then the container
 * reads files it had never opened (overlay looks data-only layers up on the
 * first open, pool first).
 *
 * Everything is real: registry, gear convert, dockerd 20.10 with the gear
 * graph-driver plugin, overlayfs metacopy mounts, FUSE.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GEAR_CLI, gearDaemonAvailable, startDockerd, type Dockerd } from '../helpers/dockerd.js';
import { busyboxLayer, writeDockerArchive, type LayerEntry } from '../helpers/oci-images.js';
import { runOk, waitFor } from '../helpers/proc.js';
import { startRegistry, type TestRegistry } from '../helpers/registry.js';

const hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const md5 = (b: Buffer) => createHash('md5').update(b).digest('hex');

let reg: TestRegistry | undefined;
let work: string | undefined;
let D: Dockerd | undefined;
let available = false;
let image = '';

/** first: opened before the crash; probe: opened while the daemon is dead; never*: first opened after the restart. */
const files: Record<string, Buffer> = {
  first: randomBytes(120_000),
  probe: randomBytes(90_000),
  never1: randomBytes(1),
  never2: randomBytes(70_000),
  never3: randomBytes(2_500_000),
  never4: Buffer.from('a small text file\n'),
};

async function driverStatus(d: Dockerd): Promise<Record<string, string>> {
  const r = await d.dockerOk(['info', '--format', '{{json .DriverStatus}}']);
  // null while dockerd cannot reach the plugin (just restarted)
  return Object.fromEntries((JSON.parse(r.stdout) as [string, string][] | null) ?? []);
}

const inPool = (d: Dockerd, content: Buffer) => {
  const h = hex(content);
  return existsSync(join(d.gearRoot!, 'pool', 'sha256', h.slice(0, 2), h));
};

beforeAll(async () => {
  available = await gearDaemonAvailable();
  if (!available) return;
  work = mkdtempSync('/tmp/gear-crash-it-');
  reg = await startRegistry();
  const entries: LayerEntry[] = [
    ...(await busyboxLayer()),
    { path: 'data/', type: 'dir' },
    ...Object.entries(files).map(([n, content]) => ({ path: `data/${n}`, content, mode: 0o644 })),
  ];
  const archive = join(work, 'src.tar');
  await writeDockerArchive(archive, [entries], 'src/crash:v1');
  image = `${reg.host}/gear/crash:v1`;
  await runOk(process.execPath, [GEAR_CLI, 'convert', '--format-version', '2', '--no-progress', '--storage', 'raw', `docker-archive:${archive}`, image], { timeoutMs: 300_000 });
  D = await startDockerd({ driver: 'gear', gearArgs: ['--fetch-timeout', '10s'] });
}, 300_000);

afterAll(async () => {
  // stop() kills only what the helper started (dockerd, its containerd, the gear daemon) and unmounts under its dir.
  await D?.stop();
  await reg?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
}, 120_000);

describe('crash resume', () => {
  it('after kill -9 and a restart of the gear daemon, a running container reads files it had never opened', async (ctx) => {
    if (!available) return ctx.skip();
    const d = D!;
    await d.dockerOk(['pull', image]);
    // Warm busybox (and runc's /etc reads) into the pool with a first container, so the long-running
    // container's overlay finds its binary in the pool: a file a container first opened through the
    // miss filesystem keeps pointing at that (soon dead) connection (see src/core/lazy/resume.ts).
    await d.dockerOk(['run', '--rm', image, 'true']);
    const id = (await d.dockerOk(['run', '-d', image, 'sh', '-c', 'sleep 600'])).stdout.trim();
    try {
      const first = await d.dockerOk(['exec', id, 'sh', '-c', 'md5sum /data/first | cut -c1-32']);
      expect(first.stdout.trim()).toBe(md5(files.first!));
      for (const n of ['probe', 'never1', 'never2', 'never3', 'never4']) expect(inPool(d, files[n]!), n).toBe(false);
      expect((await driverStatus(d))['Resume']).toMatch(/^none/);

      // The container's root (the same overlay mount its processes use): docker exec needs the
      // graph driver (GetMetadata), so while the daemon is dead the test reads through this path.
      const merged = (await d.dockerOk(['inspect', '-f', '{{.GraphDriver.Data.MergedDir}}', id])).stdout.trim();
      expect(existsSync(join(merged, 'data', 'probe'))).toBe(true);

      await d.killGear!();
      // The old miss filesystem is dead: an uncached file cannot be opened now.
      const dead = await readFile(join(merged, 'data', 'probe')).then(
        () => 'read',
        (e: NodeJS.ErrnoException) => e.code ?? String(e),
      );
      expect(dead).toMatch(/^(ENOTCONN|ECONNABORTED|EIO)$/);

      await d.startGear!();
      // The restarted daemon opens its store at once (fixed --root) and completes the mounted index's files.
      let st: Record<string, string> = {};
      const done = await waitFor(async () => /done/.test((st = await driverStatus(d))['Resume'] ?? ''), 60_000, 500);
      expect(done, `Resume: ${st['Resume']}\n${d.logTail(30)}`).toBe(true);
      const total = Object.keys(files).length + 3; // + bin/busybox, etc/passwd, etc/group (etc/empty is empty: no Gear file)
      expect(st['Resume']).toMatch(new RegExp(`^${total} of ${total} files in the pool \\(1 index layers in use at start\\), done`));
      expect(st['Resume']).not.toMatch(/failed|over the pool cap/);
      for (const n of ['probe', 'never1', 'never2', 'never3', 'never4']) expect(inPool(d, files[n]!), n).toBe(true);

      // The container, still on the first daemon's overlay, now opens files it never opened: from the pool.
      for (const n of ['probe', 'never1', 'never2', 'never3', 'never4']) {
        const r = await d.dockerOk(['exec', id, 'sh', '-c', `md5sum /data/${n} | cut -c1-32`]);
        expect(r.stdout.trim(), n).toBe(md5(files[n]!));
      }
      expect((await d.dockerOk(['inspect', '-f', '{{.State.Running}}', id])).stdout.trim()).toBe('true');
      // New containers use the new miss filesystem as usual.
      const fresh = await d.dockerOk(['run', '--rm', image, 'sh', '-c', 'md5sum /data/never3 | cut -c1-32']);
      expect(fresh.stdout.trim()).toBe(md5(files.never3!));
    } finally {
      if (d.gearPid!() === undefined) await d.startGear!().catch(() => undefined); // so dockerd can unmount on rm
      await d.docker(['rm', '-f', id]);
    }
  }, 240_000);
});
