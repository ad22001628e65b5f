/**
 * mountAsync / umount2Async: mount(2) and umount2(2) on a libuv worker thread
 * (the store mounts overlays over the miss filesystem this way, so that the
 * JS thread can answer the FUSE requests the mount makes). Relative paths in
 * the mount data resolve against the given cwd, and the cwd of the process's
 * other threads never moves.
 */
import fsSync from 'node:fs';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { constants, native } from '../../src/core/sys/native.js';
import { mountsUnder } from '../../src/core/sys/mounts.js';

let dir: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-native-mount-'));
});

afterEach(async () => {
  for (const m of mountsUnder(dir).reverse()) native.umount2(m.mountPoint, constants.MNT_DETACH);
  await fs.rm(dir, { recursive: true, force: true });
});

async function rejection(p: Promise<unknown>): Promise<NodeJS.ErrnoException> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, 'expected a rejection').toBeInstanceOf(Error);
  return err as NodeJS.ErrnoException;
}

describe('native mountAsync and umount2Async', () => {
  it('mounts an overlay whose lowerdirs are relative to cwd, on a worker thread, without moving the process cwd', async () => {
    const cwd = process.cwd();
    const marker = path.relative(cwd, fsSync.realpathSync(path.join(cwd, 'package.json')));
    const n = 24;
    for (let i = 0; i < n; i++) {
      await fs.mkdir(path.join(dir, `root${i}/l/low`), { recursive: true });
      await fs.mkdir(path.join(dir, `root${i}/l/base`), { recursive: true });
      await fs.writeFile(path.join(dir, `root${i}/l/low/who`), `root ${i}\n`);
      await fs.mkdir(path.join(dir, `mnt${i}`));
    }
    // Many mounts in flight on the worker threads while the JS thread and the
    // other threads keep resolving a relative path against the process cwd.
    const mounts = Array.from({ length: n }, (_, i) =>
      native.mountAsync('overlay', path.join(dir, `mnt${i}`), 'overlay', constants.MS_RDONLY, 'lowerdir=l/low:l/base', path.join(dir, `root${i}`)),
    );
    const reads = Array.from({ length: n }, () => fs.readFile(marker, 'utf8'));
    await Promise.all(mounts);
    for (const r of await Promise.all(reads)) expect(r).toMatch(/"name"/);
    expect(process.cwd()).toBe(cwd);
    for (let i = 0; i < n; i++) expect(await fs.readFile(path.join(dir, `mnt${i}/who`), 'utf8')).toBe(`root ${i}\n`);
    expect(mountsUnder(dir).filter((m) => m.fsType === 'overlay')).toHaveLength(n);

    await Promise.all(Array.from({ length: n }, (_, i) => native.umount2Async(path.join(dir, `mnt${i}`), 0)));
    expect(mountsUnder(dir)).toEqual([]);
    expect(process.cwd()).toBe(cwd);
  });

  it('rejects with an fs-style error naming the call and the path', async () => {
    await fs.mkdir(path.join(dir, 'root/l/low'), { recursive: true });
    const missing = path.join(dir, 'no-such-target');
    const e1 = await rejection(native.mountAsync('overlay', missing, 'overlay', 0, 'lowerdir=l/low', path.join(dir, 'root')));
    expect([e1.code, e1.syscall, e1.path]).toEqual(['ENOENT', 'mount', missing]);
    const e2 = await rejection(native.mountAsync('overlay', dir, 'overlay', 0, 'lowerdir=l/low', path.join(dir, 'no-such-cwd')));
    expect([e2.code, e2.syscall]).toEqual(['ENOENT', 'chdir']);
    const e3 = await rejection(native.umount2Async(dir, 0));
    expect([e3.code, e3.syscall, e3.path]).toEqual(['EINVAL', 'umount2', dir]);
    expect(() => native.mountAsync('overlay', `${dir}\0x`, 'overlay', 0, '')).toThrow(/NUL/);
  });
});
