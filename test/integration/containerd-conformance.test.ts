/**
 * containerd's own snapshotter conformance suite (snapshots/testsuite) against
 * `gear snapshotter`, through containerd's gRPC proxy client, for two
 * containerd versions:
 * - 1.6 (test/conformance): Debian 12's golang-github-containerd-containerd-dev
 *   in /usr/share/gocode, built with Debian 12's Go 1.19;
 * - 2.1 (test/conformance2): Debian unstable's golang-github-containerd-containerd-dev
 *   2.1 and the -dev packages of its dependencies, built with unstable's Go, all
 *   from the tree scripts/install-unstable.sh fills (UNSTABLE_ROOT).
 * Both are built offline in GOPATH mode. Needs root (the suite mounts what the
 * snapshotter returns) and dist/ (`npx tsc -p tsconfig.json`).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { GEAR_CLI, REPO_ROOT } from '../helpers/dockerd.js';
import { UNSTABLE_ROOT } from '../helpers/unstable.js';

const GO_TIMEOUT = '18m';
/** Above GO_TIMEOUT, so a hung suite is reported by go test (with its goroutine dump), not cut off by vitest. */
const TEST_TIMEOUT_MS = 20 * 60_000;

/** The Debian-unstable tree of scripts/install-unstable.sh (as test/helpers/containerd.ts names it). */

/** The newest Go toolchain unpacked in the unstable tree (usr/lib/go-1.N), or undefined. */
function unstableGoroot(): string | undefined {
  const lib = join(UNSTABLE_ROOT, 'usr/lib');
  const gos = existsSync(lib) ? readdirSync(lib).filter((d) => /^go-1\.\d+$/.test(d) && existsSync(join(lib, d, 'bin/go'))) : [];
  gos.sort((a, b) => Number(a.slice(5)) - Number(b.slice(5)));
  return gos.length ? join(lib, gos[gos.length - 1]!) : undefined;
}

interface SuiteRun {
  /** Directory of the Go test package. */
  dir: string;
  /** GOPATH entries before the per-run temp dir. */
  gopath: string[];
  /** GOROOT of the Go toolchain (its bin/go is run); undefined: the system's `go`. */
  goroot?: string;
}

/** Every case of containerd's SnapshotterSuite, 1.6 and 2.1 alike (names are upstream's, typos included). */
const SUITE_CASES = [
  'Basic',
  'StatActive',
  'StatComitted',
  'TransitivityTest',
  'PreareViewFailingtest',
  'Update',
  'Remove',
  'Walk',
  'LayerFileupdate',
  'RemoveDirectoryInLowerLayer',
  'Chown',
  'DirectoryPermissionOnCommit',
  'RemoveIntermediateSnapshot',
  'DeletedFilesInChildSnapshot',
  'MoveFileFromLowerLayer',
  'Rename',
  'ViewReadonly',
  'StatInWalk',
  'CloseTwice',
  'RootPermission',
  '128LayersMount',
];

/**
 * containerd 1.6's suite skips "Rename" itself, unconditionally, for every
 * snapshotter ("rename test still fails on some kernels with overlay").
 * TestGearRename runs the same steps unskipped. containerd 2.1 skips nothing.
 */
const UPSTREAM_SKIPPED_16: Record<string, string> = {
  Rename: 'rename test still fails on some kernels with overlay',
};

interface GoResult {
  code: number | null;
  output: string;
}

function runGoTest(suite: SuiteRun): Promise<GoResult> {
  const gopath = mkdtempSync(join(tmpdir(), 'gear-gopath-'));
  cleanups.push(() => rmSync(gopath, { recursive: true, force: true }));
  const go = suite.goroot ? join(suite.goroot, 'bin/go') : 'go';
  return new Promise((resolve, reject) => {
    const child = spawn(go, ['test', '-v', '-count=1', `-timeout=${GO_TIMEOUT}`, '.', '-args', '-test.root'], {
      cwd: suite.dir,
      env: {
        ...process.env,
        ...(suite.goroot ? { GOROOT: suite.goroot, PATH: `${join(suite.goroot, 'bin')}:${process.env.PATH ?? ''}` } : {}),
        GO111MODULE: 'off',
        GOTOOLCHAIN: 'local',
        GOPATH: [...suite.gopath, gopath].join(':'),
        GOFLAGS: '',
        GOCACHE: process.env.GOCACHE ?? join(tmpdir(), 'gear-gocache'),
        GEAR_CLI,
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr.on('data', (c: Buffer) => (output += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, output }));
  });
}

/** `--- PASS: TestX/Case (1.23s)` lines → name → PASS|FAIL|SKIP. */
function parseResults(output: string): Map<string, string> {
  const results = new Map<string, string>();
  for (const m of output.matchAll(/^\s*--- (PASS|FAIL|SKIP): (\S+) \(/gm)) results.set(m[2]!, m[1]!);
  return results;
}

const cleanups: Array<() => void> = [];
afterAll(() => {
  for (const c of cleanups.splice(0)) c();
});

/** Runs one suite and checks every case: PASS, or SKIP only where upstream skips it itself. */
async function checkSuite(label: string, suite: SuiteRun, upstreamSkipped: Record<string, string>): Promise<void> {
  expect(existsSync(GEAR_CLI), `${GEAR_CLI} missing: run npx tsc -p tsconfig.json first`).toBe(true);
  const { code, output } = await runGoTest(suite);
  const results = parseResults(output);
  const report = output.split('\n').filter((l) => /--- |^(ok|FAIL|PASS)|Error|error|cannot find package/.test(l)).join('\n');
  const counts = { PASS: 0, FAIL: 0, SKIP: 0 } as Record<string, number>;
  for (const [name, r] of results) if (name.startsWith('TestGearSnapshotter/')) counts[r] = (counts[r] ?? 0) + 1;
  process.stderr.write(`${label}: ${JSON.stringify(counts)} of ${SUITE_CASES.length} cases; TestGearRename ${results.get('TestGearRename')}\n`);

  for (const name of SUITE_CASES) {
    const got = results.get(`TestGearSnapshotter/${name}`);
    const want = upstreamSkipped[name] ? 'SKIP' : 'PASS';
    expect(got, `${label}: case ${name}\n${report}`).toBe(want);
  }
  // The skips are upstream's own, not ours, and the skipped steps pass (or fail only as documented).
  for (const [name, reason] of Object.entries(upstreamSkipped)) {
    expect(output, `skip reason of ${name}`).toContain(reason);
  }
  expect(results.get('TestGearRename'), report).toBe('PASS');
  expect(results.get('TestGearSnapshotter'), report).toBe('PASS');
  expect(code, report).toBe(0);

  // Every suite case unmounted what it mounted and every gear process is gone.
  // Only the suite's own mount points: its temp dirs and containerd's temp mounts directly in
  // the temp dir (other tests' containerds keep theirs under their own roots).
  const suiteTmp = /^\/(snapshot-suite-(Gear|overlayfs)-|containerd-mount)/;
  const leftovers = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((mp) => mp.startsWith(tmpdir() + '/') && suiteTmp.test(mp.slice(tmpdir().length)));
  expect(leftovers).toEqual([]);
}

describe('containerd snapshotter conformance suite over the gear socket', () => {
  it('passes every case of containerd 1.6 snapshots/testsuite through snapshots/proxy', async () => {
    await checkSuite('containerd 1.6 conformance', { dir: join(REPO_ROOT, 'test/conformance'), gopath: ['/usr/share/gocode'] }, UPSTREAM_SKIPPED_16);
  }, TEST_TIMEOUT_MS);

  it('passes every case of containerd 2.1 core/snapshots/testsuite through core/snapshots/proxy', async () => {
    const goroot = unstableGoroot();
    const src = join(UNSTABLE_ROOT, 'usr/share/gocode');
    const testsuite = join(src, 'src/github.com/containerd/containerd/v2/core/snapshots/testsuite');
    expect(goroot, `no Go toolchain under ${UNSTABLE_ROOT}/usr/lib: run scripts/install-unstable.sh`).toBeDefined();
    expect(existsSync(testsuite), `${testsuite} missing: run scripts/install-unstable.sh`).toBe(true);
    await checkSuite('containerd 2.1 conformance', { dir: join(REPO_ROOT, 'test/conformance2'), gopath: [src], goroot }, {});
  }, TEST_TIMEOUT_MS);
});
