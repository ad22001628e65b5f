/**
 * The images of the cold-deploy benchmark (issue 6): a base image and apps
 * built on Debian root filesystems, no public registry needed.
 *
 *   busybox   busybox `true`
 *   minbase   debootstrap minbase: `dpkg -l`
 *   pyapp-1   minbase + python3 (debootstrap --include=python3, one layer) + an
 *             app layer: python3 imports json, sqlite3, email, http.client,
 *             decimal… and runs a small sqlite query
 *   pyapp-2   the next version of that app: same base layer, a changed app
 *             layer importing a few more modules (deployed cold, and after
 *             pyapp-1 on the same node: the warm-pool case)
 *   perlapp   minbase + a perl script (core modules of perl-base)
 *   nginx     minbase + nginx-light: start nginx, answer one HTTP request
 *
 * Issue 11's wider corpus (the hard cases for a lazy format):
 *
 *   treewalk  the minbase image, task: sha256sum of every file under /etc and
 *             /usr/share/doc (hundreds of small files)
 *   python3   the python3 base image, task: python3 -c with a few imports
 *   numpy     debootstrap --include=python3-numpy as one layer: python's files
 *             are the same contents as python3's, in a different layer (files
 *             shared, layers not); task: a numpy computation
 *   pyapp-bullseye  pyapp-1's app on Debian 11 (the previous release's python3)
 *   redis     debootstrap --include=redis-server: start it, PING, SET, GET
 *   nodejs    debootstrap --include=nodejs (a ~50 MB libnode): a small script
 *
 * The Debian root filesystems are built once with debootstrap into the test
 * cache (GEAR_TEST_CACHE, default /var/cache/gear-test; a few minutes each,
 * from GEAR_TEST_MIRROR) and reused, as test/helpers/images.ts does for minbase.
 */
import { existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Dockerd } from '../../test/helpers/dockerd.js';
import { BUSYBOX_TAG, buildImage, CACHE_DIR, DEBIAN_MIRROR, importBusybox, importMinbase, MINBASE_TAG } from '../../test/helpers/images.js';
import { run, runOk } from '../../test/helpers/proc.js';
import { log } from './common.js';

export interface BenchImage {
  key: string;
  /** Tag in the long-lived overlay2 dockerd the image is published from. */
  tag: string;
  /** The task that marks the container done (it must exit 0). */
  task: string[];
  /** Full-read / warm-read measurements after the task (minbase). */
  reads?: boolean;
  /** Deployed again right after this image on the same node: the second version of the app. */
  nextVersion?: string;
  build(d: Dockerd): Promise<void>;
}

/** Path of the cached rootfs tar of `debootstrap --variant=minbase --include=<include> <suite>`. */
export async function ensureDebianRootfs(key: string, include: string[], suite = 'bookworm'): Promise<string> {
  const file = join(CACHE_DIR, `${key}-${suite}.tar`);
  if (existsSync(file) && statSync(file).size > 10_000_000) return file;
  mkdirSync(CACHE_DIR, { recursive: true });
  const work = mkdtempSync(join(CACHE_DIR, '.build-'));
  const rootfs = join(work, 'rootfs');
  const t0 = Date.now();
  try {
    log(`images: building ${file} (debootstrap --include=${include.join(',')}; first time only, a few minutes)`);
    const r = await run('debootstrap', ['--variant=minbase', `--include=${include.join(',')}`, suite, rootfs, DEBIAN_MIRROR], { timeoutMs: 30 * 60_000 });
    if (r.code !== 0) throw new Error(`debootstrap failed (code ${r.code}):\n${r.stdout.slice(-3000)}\n${r.stderr.slice(-3000)}`);
    await runOk('sh', ['-c', 'rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/dev/* "$1"/debootstrap', 'sh', rootfs]);
    const tmp = join(work, 'rootfs.tar');
    await runOk('tar', ['--numeric-owner', '--xattrs', '--xattrs-include=*', '--sort=name', '-C', rootfs, '-cf', tmp, '.'], { timeoutMs: 10 * 60_000 });
    renameSync(tmp, file);
    log(`images: ${file} ready (${Math.round(statSync(file).size / 1e6)} MB, ${Math.round((Date.now() - t0) / 1000)} s)`);
    return file;
  } finally {
    await run('sh', ['-c', 'for m in $(grep -o " $1/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m"; done', 'sh', work]);
    rmSync(work, { recursive: true, force: true });
  }
}

async function has(d: Dockerd, tag: string): Promise<boolean> {
  return (await d.docker(['image', 'inspect', '-f', '{{.Id}}', tag])).code === 0;
}

async function importRootfs(d: Dockerd, key: string, include: string[], tag: string, suite = 'bookworm'): Promise<void> {
  if (await has(d, tag)) return;
  const file = await ensureDebianRootfs(key, include, suite);
  await d.dockerOk(['import', '--change', 'CMD ["/bin/bash"]', '--change', 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', file, tag], {
    timeoutMs: 600_000,
  });
}

export const PY_BASE = 'gear-bench/python3:bookworm';
const NGINX = 'gear-bench/nginx:bookworm';

/** The python3 base image (debootstrap --include=python3) in d. */
export const importPythonBase = (d: Dockerd): Promise<void> => importRootfs(d, 'python3', ['python3'], PY_BASE);
const PY_BASE_11 = 'gear-bench/python3:bullseye';
const NUMPY = 'gear-bench/numpy:bookworm';
const REDIS = 'gear-bench/redis:bookworm';
const NODEJS = 'gear-bench/nodejs:bookworm';

const TREEWALK_TASK = ['bash', '-c', 'find /etc /usr/share/doc -xdev -type f -print0 | xargs -0 sha256sum | wc -l | grep -qv "^0$" && echo ready'];

const NUMPY_TASK = ['python3', '-c', 'import numpy as np; a = np.arange(250000, dtype=np.float64).reshape(500, 500); print(float((a @ a.T).trace()))'];

/** Starts redis, then PING, SET and GET over loopback with redis-cli. */
const REDIS_TASK = [
  'bash',
  '-c',
  'redis-server --daemonize yes --save "" --appendonly no >/dev/null || exit 1; for i in $(seq 50); do [ "$(redis-cli ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done; redis-cli set k v >/dev/null && [ "$(redis-cli get k)" = v ] && echo ready',
];

const NODE_SCRIPT = `const crypto = require('crypto'); const zlib = require('zlib');
const h = crypto.createHash('sha256'); for (let i = 0; i < 10000; i++) h.update(String(i));
const z = zlib.gzipSync(Buffer.alloc(100000, 'x'));
console.log(JSON.stringify({ sha: h.digest('hex').slice(0, 12), gz: z.length, v: process.version }));`;

const PY_APP_1 = `import json, sqlite3, decimal, email.parser, http.client, urllib.parse, hashlib, collections, datetime
db = sqlite3.connect(':memory:')
db.execute('create table t (x integer, y text)')
db.executemany('insert into t values (?, ?)', [(i, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(2000)])
total = db.execute('select sum(x) from t').fetchone()[0]
msg = email.parser.Parser().parsestr('Subject: hi\\n\\nbody')
print(json.dumps({'version': 1, 'sum': total, 'subject': msg['subject'], 'd': str(decimal.Decimal('1.10') * 3)}))
`;

const PY_APP_2 = `import json, sqlite3, decimal, email.parser, http.client, urllib.parse, hashlib, collections, datetime
import csv, io, textwrap, argparse, logging
from util import summary
db = sqlite3.connect(':memory:')
db.execute('create table t (x integer, y text)')
db.executemany('insert into t values (?, ?)', [(i, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(3000)])
rows = db.execute('select x, y from t where x % 100 = 0').fetchall()
out = io.StringIO()
csv.writer(out).writerows(rows)
logging.basicConfig(level=logging.WARNING)
print(json.dumps({'version': 2, 'summary': summary(rows), 'csv': len(out.getvalue())}))
`;

const PY_UTIL_2 = `import statistics
def summary(rows):
    xs = [x for x, _ in rows]
    return {'n': len(xs), 'mean': statistics.mean(xs)}
`;

const PERL_APP = `use strict;
use warnings;
use POSIX qw(floor);
use List::Util qw(sum max);
use File::Spec;
use Getopt::Long;
my @xs = map { floor($_ * 1.5) } 1 .. 5000;
printf "sum %d max %d check %d %s\\n", sum(@xs), max(@xs), unpack('%32C*', join(',', @xs)), File::Spec->catfile('a', 'b');
`;

/** Starts nginx, answers one request over loopback (bash /dev/tcp), prints the status line. */
const NGINX_TASK = [
  'bash',
  '-c',
  'nginx || exit 1; for i in $(seq 50); do { exec 3<>/dev/tcp/127.0.0.1/80; } 2>/dev/null && break; sleep 0.1; done; printf "GET / HTTP/1.0\\r\\n\\r\\n" >&3; head -1 <&3 | grep -q "200 OK" && echo ready',
];

export const BENCH_IMAGES: BenchImage[] = [
  { key: 'busybox', tag: BUSYBOX_TAG, task: ['true'], build: async (d) => void ((await has(d, BUSYBOX_TAG)) || (await importBusybox(d))) },
  {
    key: 'minbase',
    tag: MINBASE_TAG,
    task: ['bash', '-c', 'dpkg -l >/dev/null && echo ready'],
    reads: true,
    build: async (d) => void ((await has(d, MINBASE_TAG)) || (await importMinbase(d))),
  },
  {
    key: 'pyapp-1',
    tag: 'gear-bench/pyapp:1',
    task: ['python3', '/app/app.py'],
    nextVersion: 'pyapp-2',
    build: async (d) => {
      if (await has(d, 'gear-bench/pyapp:1')) return;
      await importRootfs(d, 'python3', ['python3'], PY_BASE);
      await buildImage(d, 'gear-bench/pyapp:1', `FROM ${PY_BASE}\nCOPY app /app\nWORKDIR /app\nCMD ["python3", "/app/app.py"]\n`, { 'app/app.py': PY_APP_1 });
    },
  },
  {
    key: 'pyapp-2',
    tag: 'gear-bench/pyapp:2',
    task: ['python3', '/app/app.py'],
    build: async (d) => {
      if (await has(d, 'gear-bench/pyapp:2')) return;
      await importRootfs(d, 'python3', ['python3'], PY_BASE);
      await buildImage(d, 'gear-bench/pyapp:2', `FROM ${PY_BASE}\nCOPY app /app\nWORKDIR /app\nCMD ["python3", "/app/app.py"]\n`, {
        'app/app.py': PY_APP_2,
        'app/util.py': PY_UTIL_2,
      });
    },
  },
  {
    key: 'perlapp',
    tag: 'gear-bench/perlapp:1',
    task: ['perl', '/app/app.pl'],
    build: async (d) => {
      if (await has(d, 'gear-bench/perlapp:1')) return;
      if (!(await has(d, MINBASE_TAG))) await importMinbase(d);
      await buildImage(d, 'gear-bench/perlapp:1', `FROM ${MINBASE_TAG}\nCOPY app /app\nCMD ["perl", "/app/app.pl"]\n`, { 'app/app.pl': PERL_APP });
    },
  },
  {
    key: 'nginx',
    tag: NGINX,
    task: NGINX_TASK,
    build: async (d) => importRootfs(d, 'nginx', ['nginx-light'], NGINX),
  },
  { key: 'treewalk', tag: MINBASE_TAG, task: TREEWALK_TASK, build: async (d) => void ((await has(d, MINBASE_TAG)) || (await importMinbase(d))) },
  {
    key: 'python3',
    tag: PY_BASE,
    task: ['python3', '-c', 'import json, sqlite3, decimal, email.parser, http.client; print("ready")'],
    build: async (d) => importRootfs(d, 'python3', ['python3'], PY_BASE),
  },
  { key: 'numpy', tag: NUMPY, task: NUMPY_TASK, build: async (d) => importRootfs(d, 'numpy', ['python3', 'python3-numpy'], NUMPY) },
  {
    key: 'pyapp-bullseye',
    tag: 'gear-bench/pyapp:bullseye',
    task: ['python3', '/app/app.py'],
    build: async (d) => {
      if (await has(d, 'gear-bench/pyapp:bullseye')) return;
      await importRootfs(d, 'python3', ['python3'], PY_BASE_11, 'bullseye');
      await buildImage(d, 'gear-bench/pyapp:bullseye', `FROM ${PY_BASE_11}\nCOPY app /app\nWORKDIR /app\nCMD ["python3", "/app/app.py"]\n`, { 'app/app.py': PY_APP_1 });
    },
  },
  { key: 'redis', tag: REDIS, task: REDIS_TASK, build: async (d) => importRootfs(d, 'redis', ['redis-server'], REDIS) },
  {
    key: 'nodejs',
    tag: 'gear-bench/nodeapp:1',
    task: ['node', '/app/app.js'],
    build: async (d) => {
      if (await has(d, 'gear-bench/nodeapp:1')) return;
      await importRootfs(d, 'nodejs', ['nodejs'], NODEJS);
      await buildImage(d, 'gear-bench/nodeapp:1', `FROM ${NODEJS}\nCOPY app /app\nCMD ["node", "/app/app.js"]\n`, { 'app/app.js': NODE_SCRIPT });
    },
  },
];
