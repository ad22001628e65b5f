/**
 * Differential test: the same operations on a dockerd running overlay2 (the
 * reference) and one running Gear must give identical results, as a user sees
 * them: `docker diff`, `docker export` listings (path, type, mode, uid, gid,
 * size, content sha256, link target, security xattrs from the tar), the tree
 * and xattrs seen through the container root, and the same after `docker
 * commit` and after `docker build` running the operations in a RUN step.
 *
 * The base image is generated (docker-archive, `docker load`), so it is
 * byte-identical on both daemons: busybox + a fixture layer (odd modes,
 * owners, hard links, symlinks, fifos, a device, user.* and
 * security.capability xattrs) + a layer with whiteouts and an opaque dir.
 *
 * GEAR_TEST_DRIVER=overlay2 compares overlay2 with itself (checks the test is
 * deterministic).
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startDockerd, type Dockerd, type Driver } from '../helpers/dockerd.js';
import { buildImage, busyboxLayer, loadLayers, tarBuffer, type TarEntry } from '../helpers/images.js';
import { run } from '../helpers/proc.js';

const CANDIDATE = (process.env.GEAR_TEST_DRIVER ?? 'gear') as Driver;
const BASE = 'gear-test/diffbase:1';

/** vfs_cap_data revision 2, effective, permitted = CAP_NET_RAW (13). */
const CAP_NET_RAW = String.fromCharCode(1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
const CAP_HEX = '0x0100000200200000000000000000000000000000';

function fixtureLayer(): TarEntry[] {
  // Deterministic pseudo-random content.
  const big = Buffer.alloc(1 << 20);
  let x = 12345;
  for (let i = 0; i < big.length; i++) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    big[i] = x >> 16;
  }
  return [
    { name: 'fx/', type: 'directory' },
    { name: 'fx/append.txt', content: 'line1\n' },
    { name: 'fx/truncate.txt', content: '0123456789\n' },
    { name: 'fx/empty-me.txt', content: 'data\n' },
    { name: 'fx/overwrite.txt', content: 'orig\n' },
    { name: 'fx/delete.txt', content: 'bye\n' },
    { name: 'fx/chmod.txt', content: 'mode\n', mode: 0o644 },
    { name: 'fx/suid.txt', content: 'suid\n', mode: 0o755 },
    { name: 'fx/chown.txt', content: 'owner\n', uid: 3, gid: 4 },
    { name: 'fx/rename.txt', content: 'rename me\n' },
    { name: 'fx/touch.txt', content: 'touch\n' },
    { name: 'fx/big.bin', content: big },
    { name: 'fx/xattr.txt', content: 'xattrs\n', pax: { 'SCHILY.xattr.user.gear': 'hello', 'SCHILY.xattr.user.other': 'v2' } },
    { name: 'fx/cap.bin', content: 'cap\n', mode: 0o755, pax: { 'SCHILY.xattr.security.capability': CAP_NET_RAW } },
    { name: 'fx/cap-chown.bin', content: 'cap2\n', mode: 0o755, pax: { 'SCHILY.xattr.security.capability': CAP_NET_RAW } },
    { name: 'fx/dir/', type: 'directory', mode: 0o755 },
    { name: 'fx/dir/sub/', type: 'directory', mode: 0o750, uid: 1, gid: 1 },
    { name: 'fx/dir/sub/f', content: 'f\n' },
    { name: 'fx/rmdir/', type: 'directory' },
    { name: 'fx/rmdir/x/', type: 'directory' },
    { name: 'fx/rmdir/x/y/', type: 'directory' },
    { name: 'fx/rmdir/x/y/z', content: 'z\n' },
    { name: 'fx/rmdir/top', content: 'top\n' },
    { name: 'fx/renamedir/', type: 'directory', mode: 0o711 },
    { name: 'fx/renamedir/inner/', type: 'directory' },
    { name: 'fx/renamedir/inner/file', content: 'inner\n' },
    { name: 'fx/renamedir/.hidden', content: 'hidden\n' },
    { name: 'fx/hl-src', content: 'linked\n' },
    { name: 'fx/hl-other', type: 'link', linkname: 'fx/hl-src' },
    { name: 'fx/hl-a', content: 'pair\n' },
    { name: 'fx/hl-b', type: 'link', linkname: 'fx/hl-a' },
    { name: 'fx/sym', type: 'symlink', linkname: 'does-not-exist' },
    { name: 'fx/symdir', type: 'symlink', linkname: 'dir' },
    { name: 'fx/fifo-lower', type: 'fifo', mode: 0o600 },
    { name: 'fx/null-lower', type: 'character-device', mode: 0o666, devmajor: 1, devminor: 3 },
    { name: 'fx/owned/', type: 'directory', mode: 0o750, uid: 5, gid: 6 },
    { name: 'fx/owned/file', content: 'owned\n', uid: 5, gid: 6, mode: 0o640 },
    { name: 'fx/dir2file/', type: 'directory' },
    { name: 'fx/dir2file/child', content: 'child\n' },
    { name: 'fx/file2dir', content: 'was a file\n' },
    { name: 'fx/sticky/', type: 'directory', mode: 0o1777 },
    { name: 'fx/l3-gone', content: 'removed by layer 3\n' },
    { name: 'fx/opq/', type: 'directory' },
    { name: 'fx/opq/old', content: 'hidden by layer 3\n' },
  ];
}

function whiteoutLayer(): TarEntry[] {
  return [
    { name: 'fx/', type: 'directory' },
    { name: 'fx/.wh.l3-gone', content: '' },
    { name: 'fx/opq/', type: 'directory' },
    { name: 'fx/opq/.wh..wh..opq', content: '' },
    { name: 'fx/opq/new', content: 'layer 3\n' },
    { name: 'fx/layer3.txt', content: 'layer 3 file\n' },
  ];
}

/** The operation script, busybox sh. Everything it touches is listed in the comparisons. */
const OPS = [
  'set -e',
  'cd /fx',
  // create
  'echo created > new.txt',
  'mkdir -p newdir/a/b && echo deep > newdir/a/b/f',
  'dd if=/dev/zero of=zeros.bin bs=1024 count=300 2>/dev/null',
  // append, truncate, overwrite
  'echo appended >> append.txt',
  'truncate -s 3 truncate.txt',
  ': > empty-me.txt',
  'echo replaced > overwrite.txt',
  'dd if=/dev/zero of=big.bin bs=1 count=10 seek=1000 conv=notrunc 2>/dev/null',
  // delete
  'rm delete.txt',
  // chmod and chown of lower files and dirs (metadata-only copy-up)
  'chmod 0600 chmod.txt',
  'chmod 4755 suid.txt',
  'chmod 0700 dir',
  'chown 1000:1000 chown.txt',
  'chown 2:2 dir/sub',
  'chown -h 7:8 sym',
  'chmod 0644 xattr.txt',
  'chmod 0700 cap.bin',
  'chown 0:0 cap-chown.bin',
  // rename file and dirs (lower dir with content: redirect_dir or copy)
  'mv rename.txt renamed.txt',
  'mv renamedir renameddir',
  'mv dir/sub dir/sub-moved',
  // rm -rf dir + recreate
  'rm -rf rmdir && mkdir rmdir && echo fresh > rmdir/fresh',
  'rm -rf dir2file && echo now-a-file > dir2file',
  'rm file2dir && mkdir file2dir && echo inside > file2dir/x',
  // hard links: to a lower file, between upper files, break one of a lower pair
  'ln hl-src hl-new',
  'echo upper > hl-upper && ln hl-upper hl-upper2',
  'echo changed >> hl-a',
  // symlinks
  'ln -s renamed.txt sym-new',
  'ln -sfn other-target sym',
  'ln -s /fx/renameddir sym-abs',
  // fifos and devices
  'mkfifo fifo-new',
  'rm fifo-lower',
  'mknod null-new c 1 3',
  // touch
  "touch -d '2010-10-10 10:10:10' touch.txt",
  "touch -d '2011-11-11 11:11:11' owned",
  'touch newly-touched',
  // sticky dir, opaque dir of layer 3
  'echo s > sticky/s && chmod 1770 sticky',
  'echo more > opq/new2 && rm opq/new',
  'rm layer3.txt',
].join('\n');

/** Stat lines of everything under /fx (no inode numbers, no dir sizes, mtimes only where set). */
const STAT_ALL =
  "cd /fx && find . | sort | while read p; do if [ -d \"$p\" ] && [ ! -L \"$p\" ]; then stat -c '%n %F %a %u %g' \"$p\"; " +
  "else stat -c '%n %F %a %u %g %s %h %t:%T' \"$p\"; fi; done; stat -c '%n %Y' touch.txt owned; " +
  'cat new.txt append.txt truncate.txt overwrite.txt hl-new hl-a hl-b renamed.txt renameddir/inner/file dir2file opq/new2; ' +
  'readlink sym sym-new sym-abs symdir; md5sum big.bin zeros.bin';

interface Listing {
  lines: string[];
}

/** A docker export (or save layer) tar as sorted lines: path type mode uid:gid size sha link xattrs. */
async function listTar(file: string, filter: (p: string) => boolean = (p) => p === 'fx' || p.startsWith('fx/')): Promise<Listing> {
  const lines: string[] = [];
  const ex = tar.extract();
  const done = new Promise<void>((resolve, reject) => {
    ex.on('entry', (h, stream, next) => {
      const hash = createHash('sha256');
      stream.on('data', (c: unknown) => hash.update(c as Buffer));
      stream.on('end', () => {
        const p = h.name.replace(/^\.?\//, '').replace(/\/$/, '');
        if (filter(p)) {
          const pax = (h.pax ?? {}) as Record<string, string>;
          const xattrs = Object.keys(pax)
            .filter((k) => k.startsWith('SCHILY.xattr.'))
            .sort()
            .map((k) => `${k.slice(13)}=${Buffer.from(pax[k]!, 'latin1').toString('hex')}`)
            .join(',');
          const size = h.type === 'file' ? String(h.size) : '-';
          const sum = h.type === 'file' ? hash.digest('hex').slice(0, 16) : '-';
          const dev = h.type === 'character-device' || h.type === 'block-device' ? ` dev=${h.devmajor}:${h.devminor}` : '';
          lines.push(
            `${p} ${h.type} ${((h.mode ?? 0) & 0o7777).toString(8)} ${h.uid}:${h.gid} ${size} ${sum} ${h.linkname ?? '-'}${dev}${xattrs ? ' xattrs=' + xattrs : ''}`,
          );
        }
        next();
      });
      stream.on('error', reject);
    });
    ex.on('finish', () => resolve());
    ex.on('error', reject);
  });
  createReadStream(file).pipe(ex);
  await done;
  return { lines: lines.sort() };
}

interface Side {
  d: Dockerd;
  work: string;
}

/** What one daemon produced for the comparisons. */
interface Result {
  opsCode: number | null;
  opsErr: string;
  stat: string;
  diff: string[];
  hostXattrs: string;
  export: string[];
  committedExport: string[];
  committedStat: string;
  committedDiffIds: number;
  builtExport: string[];
  builtStat: string;
}

async function exportLines(s: Side, container: string, name: string): Promise<string[]> {
  const file = join(s.work, `${name}.tar`);
  await s.d.dockerOk(['export', '-o', file, container]);
  const l = await listTar(file);
  rmSync(file, { force: true });
  return l.lines;
}

/** xattrs (user.* and security.*) under /fx as the host sees them through the container's root. */
async function hostXattrs(s: Side, container: string): Promise<string> {
  const pid = (await s.d.dockerOk(['inspect', '-f', '{{.State.Pid}}', container])).stdout.trim();
  const root = `/proc/${pid}/root`;
  const r = await run('getfattr', ['-R', '-P', '-h', '-d', '-m', '^(user|security)\\.', '-e', 'hex', '--absolute-names', `${root}/fx`]);
  // One block per file; sorted, since readdir order may legitimately differ between drivers.
  const blocks = r.stdout
    .split(root)
    .join('')
    .split(/\n\s*\n/)
    .map((b) => b.trim())
    .filter(Boolean)
    .sort();
  return blocks.join('\n\n') + (r.code === 0 ? '' : `\n[getfattr code ${r.code}: ${r.stderr}]`);
}

async function runSide(s: Side): Promise<Result> {
  const d = s.d;
  const name = `ops-${randomBytes(3).toString('hex')}`;
  await d.dockerOk(['run', '-d', '--name', name, BASE, 'sleep', '3600']);
  const ops = await d.docker(['exec', name, 'sh', '-c', OPS]);
  // xattrs written by the host into the container layer (no setfattr inside busybox).
  const pid = (await d.dockerOk(['inspect', '-f', '{{.State.Pid}}', name])).stdout.trim();
  const root = `/proc/${pid}/root`;
  await run('setfattr', ['-n', 'user.upper', '-v', 'on-new-file', `${root}/fx/new.txt`]);
  await run('setfattr', ['-n', 'user.gear', '-v', 'changed', `${root}/fx/xattr.txt`]);
  await run('setfattr', ['-x', 'user.other', `${root}/fx/xattr.txt`]);
  await run('setfattr', ['-n', 'security.capability', '-v', CAP_HEX, `${root}/fx/new.txt`]);
  await run('setfattr', ['-n', 'user.dir', '-v', 'd', `${root}/fx/renameddir`]);
  const stat = await d.dockerOk(['exec', name, 'sh', '-c', STAT_ALL]);
  const diff = (await d.dockerOk(['diff', name])).stdout.split('\n').filter(Boolean).sort();
  const xattrs = await hostXattrs(s, name);
  const exp = await exportLines(s, name, 'running');
  await d.dockerOk(['stop', '-t', '1', name]);
  const img = `gear-test/committed-${name}`;
  await d.dockerOk(['commit', name, img]);
  const c2 = `${name}-c`;
  await d.dockerOk(['create', '--name', c2, img, 'true']);
  const committedExport = await exportLines(s, c2, 'committed');
  const committedStat = await d.dockerOk(['run', '--rm', img, 'sh', '-c', STAT_ALL]);
  const committedDiffIds = JSON.parse((await d.dockerOk(['image', 'inspect', '-f', '{{json .RootFS.Layers}}', img])).stdout).length as number;
  // The same operations as a build step (classic builder: a container layer diffed per RUN).
  const built = `gear-test/built-${name}`;
  await buildImage(d, built, `FROM ${BASE}\nRUN ${OPS.split('\n').join(' && \\\n ').replace(/^set -e && \\\n /, '')}\n`);
  const c3 = `${name}-b`;
  await d.dockerOk(['create', '--name', c3, built, 'true']);
  const builtExport = await exportLines(s, c3, 'built');
  const builtStat = await d.dockerOk(['run', '--rm', built, 'sh', '-c', STAT_ALL]);
  await d.dockerOk(['rm', '-f', name, c2, c3]);
  return {
    opsCode: ops.code,
    opsErr: ops.stderr,
    stat: stat.stdout,
    diff,
    hostXattrs: xattrs,
    export: exp,
    committedExport,
    committedStat: committedStat.stdout,
    committedDiffIds,
    builtExport,
    builtStat: builtStat.stdout,
  };
}

describe(`differential: overlay2 vs ${CANDIDATE}`, () => {
  const sides: Side[] = [];
  let ref: Result;
  let cand: Result;
  let baseIds: string[] = [];

  beforeAll(async () => {
    const layers = [await busyboxLayer(), await tarBuffer(fixtureLayer()), await tarBuffer(whiteoutLayer())];
    for (const driver of ['overlay2', CANDIDATE] as Driver[]) {
      const d = await startDockerd({ driver, verbose: !!process.env.GEAR_TEST_VERBOSE });
      sides.push({ d, work: mkdtempSync('/tmp/gdf-') });
      baseIds.push(await loadLayers(d, BASE, layers));
    }
    // Sequentially: the two daemons share 2 cores, and failures are easier to read.
    ref = await runSide(sides[0]!);
    cand = await runSide(sides[1]!);
    if (process.env.GEAR_TEST_DUMP) {
      writeFileSync(process.env.GEAR_TEST_DUMP, JSON.stringify({ overlay2: ref, [CANDIDATE]: cand }, null, 1));
    }
  });

  afterAll(async () => {
    for (const s of sides) {
      await s.d.stop();
      rmSync(s.work, { recursive: true, force: true });
    }
  });

  it('both daemons loaded the same base image', async () => {
    expect(baseIds[0]).toBe(baseIds[1]);
    for (const s of sides) {
      const id = (await s.d.dockerOk(['image', 'inspect', '-f', '{{.Id}}', BASE])).stdout.trim();
      expect(id).toBe(baseIds[0]);
    }
  });

  it('the operation script succeeds on both', () => {
    expect(ref.opsErr).toBe('');
    expect(ref.opsCode).toBe(0);
    expect(cand.opsErr).toBe('');
    expect(cand.opsCode).toBe(0);
    // The reference really ran the operations (guards against comparing two empty results).
    expect(ref.stat).toContain('./renameddir/inner/file regular file 644 0 0 6 1');
    expect(ref.stat).toContain('./null-new character special file 644 0 0 0 1 1:3');
  });

  it('the tree seen inside the container is identical', () => {
    expect(cand.stat).toBe(ref.stat);
  });

  it('docker diff is identical', () => {
    expect(ref.diff).toContain('D /fx/delete.txt');
    expect(ref.diff).toContain('A /fx/renameddir');
    expect(cand.diff).toEqual(ref.diff);
  });

  it('xattrs seen through the container root are identical', () => {
    expect(ref.hostXattrs).toContain('user.upper=');
    expect(ref.hostXattrs).toContain('security.capability=');
    expect(cand.hostXattrs).toBe(ref.hostXattrs);
  });

  it('docker export of the running container is identical', () => {
    expect(ref.export.some((l) => l.startsWith('fx/renamed.txt file 644 0:0 10 '))).toBe(true);
    expect(cand.export).toEqual(ref.export);
  });

  it('docker commit then export of the committed image is identical', () => {
    expect(ref.committedDiffIds).toBe(4);
    expect(cand.committedDiffIds).toBe(ref.committedDiffIds);
    expect(cand.committedExport).toEqual(ref.committedExport);
    expect(cand.committedStat).toBe(ref.committedStat);
  });

  it('the same operations in a docker build RUN step give identical images', () => {
    expect(ref.builtExport.length).toBeGreaterThan(30);
    expect(cand.builtExport).toEqual(ref.builtExport);
    expect(cand.builtStat).toBe(ref.builtStat);
  });
});
