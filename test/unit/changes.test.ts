/**
 * Changes / Diff / DiffSize of a container layer on real overlay mounts.
 *
 * Each scenario runs twice: on a plain overlay (what Docker's overlay2 uses
 * on this host: no redirect_dir, no metacopy; `mv` of a lower dir falls back
 * to copy + delete) and on a metacopy=on,redirect_dir=on overlay (what Gear
 * mounts). Both must give the same change list (the one overlay2 gives), the
 * same diff tar content and size, and the diff applied onto the lower tree
 * must reproduce the merged view.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ChangeKind, overlayChanges, treeChanges, type Change } from '../../src/core/archive/changes.js';
import { overlayDiff, overlayDiffSize } from '../../src/core/archive/export.js';
import { mountOverlay, unmount } from '../../src/core/sys/mounts.js';
import { native } from '../../src/core/sys/native.js';
import { getXattr, setXattr } from '../../src/core/sys/xattr.js';

const C = ChangeKind.Modify;
const A = ChangeKind.Add;
const D = ChangeKind.Delete;
const T0 = new Date(1_600_000_000_500); // lower-layer mtimes (with a sub-second part)

// ---------------------------------------------------------------------------
// Fixture

async function write(p: string, content: string, mode = 0o644): Promise<void> {
  await fs.mkdir(path.dirname(p), { recursive: true });
  await fs.writeFile(p, content);
  await fs.chmod(p, mode);
}

/** Two lower layers (L1 on top of L2) with all mtimes set to T0. */
async function buildLowers(l1: string, l2: string): Promise<void> {
  await write(`${l2}/etc/passwd`, 'root:x:0:0:root:/root:/bin/sh\n');
  await write(`${l2}/etc/hosts`, '127.0.0.1 localhost\n');
  await write(`${l2}/bin/sh`, '#!shell binary\n', 0o755);
  await fs.symlink('sh', `${l2}/bin/ls`);
  await write(`${l2}/data/a`, 'A\n');
  await write(`${l2}/data/sub/b`, 'B\n');
  await write(`${l2}/data/sub/c`, 'C\n');
  await write(`${l2}/data/hl1`, 'hard\n');
  await fs.link(`${l2}/data/hl1`, `${l2}/data/hl2`);
  await fs.mkdir(`${l2}/tmp`);
  await fs.chmod(`${l2}/tmp`, 0o1777);
  await fs.symlink('/etc/hosts', `${l2}/link`);
  await write(`${l1}/opt/app/run.sh`, '#!/bin/sh\necho run\n', 0o755);
  await write(`${l1}/opt/app/lib/x.so`, 'ELF'.repeat(5000));
  await write(`${l1}/etc/motd`, 'hello\n');
  for (const root of [l1, l2]) await setTimes(root);
}

async function setTimes(root: string): Promise<void> {
  const entries = await fs.readdir(root, { recursive: true });
  // Deepest first, so setting a child's time does not disturb its parent afterwards.
  for (const rel of entries.sort((a, b) => b.split('/').length - a.split('/').length)) {
    await fs.lutimes(path.join(root, rel), T0, T0);
  }
  await fs.utimes(root, T0, T0);
}

type Mode = 'native' | 'metacopy';

interface Layer {
  root: string;
  lowers: string[];
  upper: string;
  merged: string;
}

const mounted: string[] = [];
const tmpRoots: string[] = [];

afterEach(async () => {
  while (mounted.length) unmount(mounted.pop()!, { lazy: true });
  while (tmpRoots.length) await fs.rm(tmpRoots.pop()!, { recursive: true, force: true });
});

async function makeLayer(mode: Mode): Promise<Layer> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-changes-'));
  tmpRoots.push(root);
  const l1 = `${root}/l1`;
  const l2 = `${root}/l2`;
  for (const d of ['l1', 'l2', 'upper', 'work', 'merged']) await fs.mkdir(`${root}/${d}`);
  await buildLowers(l1, l2);
  const lowers = [l1, l2];
  mountOverlay(`${root}/merged`, {
    lowers,
    upper: `${root}/upper`,
    work: `${root}/work`,
    extra: mode === 'metacopy' ? ['metacopy=on', 'redirect_dir=on'] : ['redirect_dir=off', 'metacopy=off', 'index=off'],
  });
  mounted.push(`${root}/merged`);
  return { root, lowers, upper: `${root}/upper`, merged: `${root}/merged` };
}

function sh(cwd: string, script: string): void {
  execFileSync('sh', ['-ec', script], { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

// ---------------------------------------------------------------------------
// A minimal tar reader (independent of the writer) and a reference applier

interface TarItem {
  name: string;
  type: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  linkname: string;
  devmajor: number;
  devminor: number;
  xattrs: Map<string, Buffer>;
  data: Buffer;
}

function parsePax(raw: Buffer): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let pos = 0;
  while (pos < raw.length) {
    const sp = raw.indexOf(0x20, pos);
    const len = parseInt(raw.subarray(pos, sp).toString('ascii'), 10);
    const rec = raw.subarray(sp + 1, pos + len - 1);
    const eq = rec.indexOf(0x3d);
    out.set(rec.subarray(0, eq).toString('utf8'), Buffer.from(rec.subarray(eq + 1)));
    pos += len;
  }
  return out;
}

function parseTar(buf: Buffer): TarItem[] {
  const items: TarItem[] = [];
  let off = 0;
  let pax: Map<string, Buffer> | null = null;
  while (off + 512 <= buf.length) {
    const h = buf.subarray(off, off + 512);
    off += 512;
    if (h.every((b) => b === 0)) break;
    const str = (o: number, l: number): string => {
      const f = h.subarray(o, o + l);
      const nul = f.indexOf(0);
      return f.subarray(0, nul < 0 ? l : nul).toString('utf8');
    };
    const oct = (o: number, l: number): number => parseInt(str(o, l).trim() || '0', 8);
    let sum = 0;
    for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
    expect(oct(148, 8), 'header checksum').toBe(sum);
    expect(h.subarray(257, 263).toString('binary')).toBe('ustar\0');
    const type = String.fromCharCode(h[156]!);
    const size = pax?.has('size') ? Number(pax.get('size')!.toString()) : oct(124, 12);
    const data = Buffer.from(buf.subarray(off, off + size));
    off += Math.ceil(size / 512) * 512;
    if (type === 'x') {
      pax = parsePax(data);
      continue;
    }
    const prefix = str(345, 155);
    const item: TarItem = {
      name: pax?.get('path')?.toString('utf8') ?? (prefix ? `${prefix}/${str(0, 100)}` : str(0, 100)),
      type,
      mode: oct(100, 8),
      uid: pax?.has('uid') ? Number(pax.get('uid')!.toString()) : oct(108, 8),
      gid: pax?.has('gid') ? Number(pax.get('gid')!.toString()) : oct(116, 8),
      mtime: pax?.has('mtime') ? Number(pax.get('mtime')!.toString()) : oct(136, 12),
      linkname: pax?.get('linkpath')?.toString('utf8') ?? str(157, 100),
      devmajor: oct(329, 8),
      devminor: oct(337, 8),
      xattrs: new Map(),
      data,
    };
    for (const [k, v] of pax ?? []) if (k.startsWith('SCHILY.xattr.')) item.xattrs.set(k.slice(13), v);
    items.push(item);
    pax = null;
  }
  return items;
}

async function streamToBuffer(s: NodeJS.ReadableStream): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of s) chunks.push(c as Buffer);
  return Buffer.concat(chunks);
}

/** Applies a layer tar with OCI whiteouts onto dir (Docker's applyLayer, simplified). */
async function applyTar(dir: string, items: TarItem[]): Promise<void> {
  const dirTimes: [string, number][] = [];
  for (const it of items) {
    const name = it.name.replace(/\/+$/, '');
    const parent = path.join(dir, path.dirname(name));
    const base = path.basename(name);
    if (base === '.wh..wh..opq') {
      for (const n of await fs.readdir(parent)) await fs.rm(path.join(parent, n), { recursive: true, force: true });
      continue;
    }
    if (base.startsWith('.wh.')) {
      await fs.rm(path.join(parent, base.slice(4)), { recursive: true, force: true });
      continue;
    }
    const target = path.join(dir, name);
    const existing = await fs.lstat(target).catch(() => null);
    if (existing && !(existing.isDirectory() && it.type === '5')) await fs.rm(target, { recursive: true, force: true });
    switch (it.type) {
      case '5':
        if (!existing?.isDirectory()) await fs.mkdir(target);
        break;
      case '0':
        await fs.writeFile(target, it.data);
        break;
      case '2':
        await fs.symlink(it.linkname, target);
        break;
      case '1':
        await fs.link(path.join(dir, it.linkname), target);
        continue;
      case '3':
      case '4':
      case '6':
        native.mknod(target, it.mode, it.devmajor, it.devminor);
        break;
      default:
        throw new Error(`unexpected tar type ${it.type} for ${it.name}`);
    }
    await fs.lchown(target, it.uid, it.gid);
    if (it.type !== '2') await fs.chmod(target, it.mode & 0o7777);
    for (const [k, v] of it.xattrs) setXattr(target, k, v);
    if (it.type === '5') dirTimes.push([target, it.mtime]);
    else await fs.lutimes(target, it.mtime, it.mtime);
  }
  for (const [p, t] of dirTimes.reverse()) await fs.utimes(p, t, t);
}

/** Everything a tree comparison looks at, per path. */
async function snapshot(root: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (rel: string): Promise<void> => {
    for (const name of (await fs.readdir(path.join(root, rel))).sort()) {
      const r = path.join(rel, name);
      const p = path.join(root, r);
      const st = await fs.lstat(p);
      const cap = getXattr(p, 'security.capability');
      let what = `mode=${st.mode.toString(8)} uid=${st.uid} gid=${st.gid}`;
      if (cap) what += ` cap=${cap.toString('hex')}`;
      if (st.isFile()) {
        what += ` sha256=${createHash('sha256').update(await fs.readFile(p)).digest('hex')}`;
        what += ` mtime=${Math.floor(st.mtimeMs / 1000)}`;
      } else if (st.isSymbolicLink()) {
        what += ` -> ${await fs.readlink(p)}`;
      } else if (st.isCharacterDevice() || st.isBlockDevice()) {
        what += ` rdev=${st.rdev}`;
      }
      out.set(`/${r}`, what);
      if (st.isDirectory()) await walk(r);
    }
  };
  await walk('');
  return out;
}

/** moby directory.Size of a plain directory (the reference for overlay2's DiffSize). */
async function directorySize(dir: string): Promise<number> {
  const seen = new Set<bigint>();
  let size = 0;
  for (const rel of await fs.readdir(dir, { recursive: true })) {
    const st = await fs.lstat(path.join(dir, rel), { bigint: true });
    if (st.isDirectory() || st.size === 0n || seen.has(st.ino)) continue;
    seen.add(st.ino);
    size += Number(st.size);
  }
  return size;
}

/** Tar entries without the fields that depend on when the operations ran. */
function comparable(items: TarItem[]): unknown[] {
  return items.map((it) => ({
    name: it.name,
    type: it.type,
    mode: it.mode,
    uid: it.uid,
    gid: it.gid,
    linkname: it.linkname,
    dev: [it.devmajor, it.devminor],
    xattrs: [...it.xattrs].map(([k, v]) => `${k}=${v.toString('hex')}`),
    sha256: createHash('sha256').update(it.data).digest('hex'),
  }));
}

// ---------------------------------------------------------------------------
// Scenarios

interface Scenario {
  name: string;
  /** Shell commands run with the merged dir as cwd. */
  ops: string;
  expected: [ChangeKind, string][];
  /** Extra checks on the diff tar. */
  tar?: (items: TarItem[]) => void;
}

const names = (items: TarItem[]): string[] => items.map((i) => i.name);

const scenarios: Scenario[] = [
  { name: 'add file', ops: 'echo new > tmp/new', expected: [[C, '/tmp'], [A, '/tmp/new']] },
  { name: 'modify file content', ops: 'echo more >> etc/passwd', expected: [[C, '/etc/passwd']] },
  {
    name: 'chmod of a lower file',
    ops: 'chmod 600 etc/hosts',
    expected: [[C, '/etc/hosts']],
    tar: (items) => {
      const f = items.find((i) => i.name === 'etc/hosts')!;
      expect(f.mode).toBe(0o100600);
      expect(f.data.toString()).toBe('127.0.0.1 localhost\n');
    },
  },
  { name: 'chown of a lower file', ops: 'chown 1000:1001 bin/sh', expected: [[C, '/bin/sh']] },
  { name: 'delete file', ops: 'rm etc/hosts', expected: [[C, '/etc'], [D, '/etc/hosts']] },
  {
    name: 'delete dir',
    ops: 'rm -rf data/sub',
    expected: [[C, '/data'], [D, '/data/sub']],
    tar: (items) => expect(names(items)).toEqual(['data/', 'data/.wh.sub']),
  },
  {
    name: 'rename lower dir',
    ops: 'mv data/sub data/sub2',
    expected: [[C, '/data'], [D, '/data/sub'], [A, '/data/sub2'], [A, '/data/sub2/b'], [A, '/data/sub2/c']],
    tar: (items) =>
      expect(names(items)).toEqual(['data/', 'data/.wh.sub', 'data/sub2/', 'data/sub2/b', 'data/sub2/c']),
  },
  {
    name: 'move lower dir to another parent',
    ops: 'mv opt/app app2',
    expected: [[A, '/app2'], [A, '/app2/lib'], [A, '/app2/lib/x.so'], [A, '/app2/run.sh'], [C, '/opt'], [D, '/opt/app']],
  },
  {
    name: 'rename lower dir, then change inside it',
    ops: 'mv data/sub data/sub2; echo x >> data/sub2/b; rm data/sub2/c; chmod 700 data/sub2',
    expected: [[C, '/data'], [D, '/data/sub'], [A, '/data/sub2'], [A, '/data/sub2/b']],
  },
  {
    name: 'rename lower dir over a deleted name (opaque)',
    ops: 'rm -rf data/sub; mv opt/app data/sub',
    expected: [
      [C, '/data'],
      [D, '/data/sub'],
      [A, '/data/sub/lib'],
      [A, '/data/sub/lib/x.so'],
      [A, '/data/sub/run.sh'],
      [C, '/opt'],
      [D, '/opt/app'],
    ],
    tar: (items) => expect(names(items)).toContain('data/sub/.wh..wh..opq'),
  },
  { name: 'rename file', ops: 'mv etc/hosts etc/hosts.old', expected: [[C, '/etc'], [D, '/etc/hosts'], [A, '/etc/hosts.old']] },
  { name: 'delete then recreate file', ops: 'rm etc/passwd; echo new > etc/passwd', expected: [[C, '/etc'], [C, '/etc/passwd']] },
  {
    name: 'rm -rf dir then mkdir same dir (opaque)',
    ops: 'rm -rf data/sub; mkdir data/sub; echo n > data/sub/b',
    // Docker reports an opaque dir as deleted, and b as modified since /data/sub/b exists below.
    expected: [[C, '/data'], [D, '/data/sub'], [C, '/data/sub/b']],
    tar: (items) => expect(names(items)).toEqual(['data/', 'data/sub/', 'data/sub/.wh..wh..opq', 'data/sub/b']),
  },
  {
    name: 'hard link to a lower file',
    ops: 'ln etc/passwd etc/passwd2',
    expected: [[C, '/etc'], [C, '/etc/passwd'], [A, '/etc/passwd2']],
    tar: (items) => {
      const l = items.find((i) => i.name === 'etc/passwd2')!;
      expect(l.type).toBe('1');
      expect(l.linkname).toBe('etc/passwd');
    },
  },
  {
    name: 'chmod of one name of a lower hard link pair',
    ops: 'chmod 600 data/hl1',
    expected: [[C, '/data/hl1']],
  },
  {
    name: 'new hard link pair',
    ops: 'echo z > tmp/n1; ln tmp/n1 tmp/n2',
    expected: [[C, '/tmp'], [A, '/tmp/n1'], [A, '/tmp/n2']],
    tar: (items) => expect(items.find((i) => i.name === 'tmp/n2')).toMatchObject({ type: '1', linkname: 'tmp/n1' }),
  },
  { name: 'symlink change', ops: 'ln -sfn /etc/passwd link', expected: [[C, '/link']] },
  { name: 'user xattr change', ops: 'setfattr -n user.foo -v bar etc/hosts', expected: [[C, '/etc/hosts']] },
  {
    name: 'security.capability change',
    ops: 'setcap cap_net_raw+ep bin/sh',
    expected: [[C, '/bin/sh']],
    tar: (items) => expect(items.find((i) => i.name === 'bin/sh')!.xattrs.has('security.capability')).toBe(true),
  },
  { name: 'mtime-only change (touch)', ops: 'touch -d 2020-01-01T00:00:00Z etc/hosts', expected: [[C, '/etc/hosts']] },
  {
    name: 'nested new dirs',
    ops: 'mkdir -p new/a/b; echo q > new/a/b/f',
    expected: [[A, '/new'], [A, '/new/a'], [A, '/new/a/b'], [A, '/new/a/b/f']],
  },
  {
    name: 'device node and fifo',
    ops: 'mknod tmp/null c 1 3; mkfifo tmp/fifo',
    expected: [[C, '/tmp'], [A, '/tmp/fifo'], [A, '/tmp/null']],
    tar: (items) => expect(items.find((i) => i.name === 'tmp/null')).toMatchObject({ type: '3', devmajor: 1, devminor: 3 }),
  },
  {
    name: 'new dir inside a lower dir',
    ops: 'mkdir etc/new.d; echo x > etc/new.d/f',
    expected: [[C, '/etc'], [A, '/etc/new.d'], [A, '/etc/new.d/f']],
  },
  {
    name: 'recreate a deleted dir, then move a lower dir into it',
    ops: 'rm -rf data; mkdir data; mv opt/app data/sub',
    // data/sub exists below with the same mode, size and mtime: Docker does not list it
    // itself, only as the parent of the added entries.
    expected: [
      [D, '/data'],
      [C, '/data/sub'],
      [A, '/data/sub/lib'],
      [A, '/data/sub/lib/x.so'],
      [A, '/data/sub/run.sh'],
      [C, '/opt'],
      [D, '/opt/app'],
    ],
  },
  { name: 'no change', ops: 'cat etc/passwd > /dev/null', expected: [] },
];

const asChanges = (exp: [ChangeKind, string][]): Change[] => exp.map(([kind, p]) => ({ path: p, kind }));

beforeAll(() => {
  expect(process.getuid?.()).toBe(0);
});

describe('overlay layer: changes, diff and size as overlay2 reports them', () => {
  for (const sc of scenarios) {
    it(sc.name, async () => {
      const results: Record<Mode, { changes: Change[]; tar: TarItem[]; size: number; upperSize: number }> = {} as never;
      for (const mode of ['native', 'metacopy'] as Mode[]) {
        const layer = await makeLayer(mode);
        sh(layer.merged, sc.ops);
        const p = { upper: layer.upper, lowers: layer.lowers, merged: layer.merged };
        const changes = await overlayChanges(p);
        expect(changes, `${mode} changes`).toEqual(asChanges(sc.expected));
        const tar = parseTar(await streamToBuffer(overlayDiff(p)));
        sc.tar?.(tar);

        // Applied onto the lower tree, the diff gives the merged view.
        const applied = `${layer.root}/applied`;
        await fs.mkdir(applied);
        for (const l of [...layer.lowers].reverse()) execFileSync('cp', ['-a', `${l}/.`, applied]);
        await applyTar(applied, tar);
        expect(await snapshot(applied), `${mode}: applied diff = merged view`).toEqual(await snapshot(layer.merged));

        results[mode] = { changes, tar, size: await overlayDiffSize(p), upperSize: await directorySize(layer.upper) };
      }
      expect(comparable(results.metacopy.tar)).toEqual(comparable(results.native.tar));
      // overlay2's DiffSize is directory.Size of its (native) upper dir.
      expect(results.native.size).toBe(results.native.upperSize);
      expect(results.metacopy.size).toBe(results.native.size);
    });
  }

  it('known difference: a new dir renamed into a merged dir is "deleted" for overlay2, added for us', async () => {
    // overlay2 (no redirect_dir) marks a pure-upper dir opaque when it is renamed into a
    // merged dir, and Docker then lists it as deleted although nothing was below. With
    // redirect_dir=on every new dir in a merged parent is opaque, so the two cases look
    // the same in our upper dir; we report what really happened. Diffs apply the same.
    for (const mode of ['native', 'metacopy'] as Mode[]) {
      const layer = await makeLayer(mode);
      sh(layer.merged, 'mkdir tmp/x; mv tmp/x data/y');
      // The marker moby's OverlayChanges turns into "D /data/y":
      expect(getXattr(`${layer.upper}/data/y`, 'trusted.overlay.opaque')?.toString(), mode).toBe('y');
      expect(await overlayChanges({ upper: layer.upper, lowers: layer.lowers, merged: layer.merged }), mode).toEqual(
        asChanges([[C, '/data'], [A, '/data/y'], [C, '/tmp']]),
      );
    }
  });

  it('a metacopy mount really leaves metacopy files and redirects in the upper dir', async () => {
    const layer = await makeLayer('metacopy');
    sh(layer.merged, 'chmod 600 etc/hosts; mv data/sub data/sub2');
    expect(getXattr(`${layer.upper}/etc/hosts`, 'trusted.overlay.metacopy')).not.toBeNull();
    expect(getXattr(`${layer.upper}/data/sub2`, 'trusted.overlay.redirect')).not.toBeNull();
    await expect(fs.readdir(`${layer.upper}/data/sub2`)).resolves.toEqual([]);
  });
});

describe('treeChanges (naive: two whole trees)', () => {
  it('reports modify, add and delete like moby ChangesDirs', async () => {
    const root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-tree-'));
    tmpRoots.push(root);
    const [o, n] = [`${root}/old`, `${root}/new`];
    for (const d of [o, n]) {
      await write(`${d}/a/x`, 'x\n');
      await write(`${d}/a/same`, 's\n');
      await write(`${d}/b`, 'b\n');
      await fs.mkdir(`${d}/e`);
      await setTimes(d);
    }
    await fs.writeFile(`${n}/a/x`, 'changed\n');
    await write(`${n}/a/y`, 'y\n');
    await fs.rm(`${n}/b`);
    await write(`${n}/c/z`, 'z\n');
    await fs.chmod(`${n}/e`, 0o700);
    expect(await treeChanges(n, o)).toEqual(
      asChanges([
        [C, '/a'],
        [C, '/a/x'],
        [A, '/a/y'],
        [A, '/c'],
        [A, '/c/z'],
        [C, '/e'],
        [D, '/b'],
      ]),
    );
  });

  it('ignores directory mtimes but not file mtimes; compares capabilities', async () => {
    const root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-tree-'));
    tmpRoots.push(root);
    const [o, n] = [`${root}/old`, `${root}/new`];
    for (const d of [o, n]) {
      await write(`${d}/d/f`, 'f\n');
      await write(`${d}/g`, 'g\n');
      await setTimes(d);
    }
    await fs.utimes(`${n}/d`, new Date(5_000), new Date(5_000));
    expect(await treeChanges(n, o)).toEqual([]);
    await fs.utimes(`${n}/d/f`, new Date(5_000), new Date(5_000));
    execFileSync('setcap', ['cap_net_raw+ep', `${n}/g`]);
    expect(await treeChanges(n, o)).toEqual(asChanges([[C, '/d'], [C, '/d/f'], [C, '/g']]));
  });

  it('with no old tree, everything is added', async () => {
    const root = await fs.mkdtemp(path.join(os.tmpdir(), 'gear-tree-'));
    tmpRoots.push(root);
    await write(`${root}/a/b`, 'b');
    expect(await treeChanges(root, null)).toEqual(asChanges([[A, '/a'], [A, '/a/b']]));
  });
});
