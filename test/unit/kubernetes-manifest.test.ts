/**
 * deploy/kubernetes/gear-snapshotter.yaml is valid YAML and says what docs/kubernetes.md and the
 * systemd unit say: the same gear command, privileged, hostPID, Bidirectional mounts of /var/lib/gear
 * and /run/gear, /dev/fuse. Parsed with Debian's python3-yaml (scripts/install-deps.sh installs it;
 * the project has no YAML parser among its npm dependencies). No cluster is involved: the DaemonSet
 * was never run by a kubelet here.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT } from '../helpers/dockerd.js';

const MANIFEST = join(REPO_ROOT, 'deploy/kubernetes/gear-snapshotter.yaml');

/** Every document of a YAML file, as JSON (python3-yaml's safe loader). */
function loadYaml(file: string): unknown[] {
  const out = execFileSync(
    'python3',
    ['-c', 'import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))', file],
    { encoding: 'utf8' },
  );
  return JSON.parse(out) as unknown[];
}

type Any = any;

describe('deploy/kubernetes/gear-snapshotter.yaml', () => {
  it('parses as YAML: a Namespace and a DaemonSet', () => {
    const docs = loadYaml(MANIFEST) as Any[];
    expect(docs.map((d) => `${d.apiVersion}/${d.kind}`)).toEqual(['v1/Namespace', 'apps/v1/DaemonSet']);
  });

  it('the parser rejects broken YAML (the check can fail)', () => {
    const broken = readFileSync(MANIFEST, 'utf8').replace('      containers:\n', '      containers:\n   bad: [\n');
    expect(() =>
      execFileSync('python3', ['-c', 'import sys, yaml; list(yaml.safe_load_all(sys.stdin))'], { input: broken, stdio: ['pipe', 'ignore', 'ignore'] }),
    ).toThrow();
  });

  it('runs the systemd unit’s gear command, privileged, with hostPID and the host paths gear needs', () => {
    const ds = (loadYaml(MANIFEST) as Any[])[1];
    const pod = ds.spec.template.spec;
    expect(ds.spec.selector.matchLabels).toEqual(ds.spec.template.metadata.labels);
    expect(pod.hostPID).toBe(true);
    expect(pod.containers).toHaveLength(1);
    const c = pod.containers[0];
    expect(c.securityContext.privileged).toBe(true);

    // Same arguments as gear-snapshotter.service (ExecStart=@BINDIR@/gear snapshotter ...).
    const unit = readFileSync(join(REPO_ROOT, 'packaging/systemd/gear-snapshotter.service.in'), 'utf8');
    const execStart = /^ExecStart=(.*)$/m.exec(unit)![1]!.split(/\s+/);
    expect(execStart[0]).toBe('@BINDIR@/gear');
    expect(c.args).toEqual(execStart.slice(1));
    // The image (deploy/Dockerfile) runs /usr/local/bin/gear with the same default arguments.
    const dockerfile = readFileSync(join(REPO_ROOT, 'deploy/Dockerfile'), 'utf8');
    expect(dockerfile).toContain('ENTRYPOINT ["/usr/local/bin/gear"]');
    expect(dockerfile).toContain(`CMD ${JSON.stringify(execStart.slice(1)).replaceAll(',', ', ')}`);

    const mounts = new Map<string, Any>(c.volumeMounts.map((m: Any) => [m.mountPath, m]));
    const volumes = new Map<string, Any>(pod.volumes.map((v: Any) => [v.name, v]));
    for (const [path, propagation] of [
      ['/var/lib/gear', 'Bidirectional'],
      ['/run/gear', 'Bidirectional'],
      ['/dev/fuse', undefined],
    ] as const) {
      const m = mounts.get(path);
      expect(m, path).toBeDefined();
      expect(m.mountPropagation, path).toBe(propagation);
      expect(volumes.get(m.name)?.hostPath?.path, path).toBe(path);
    }
    expect(volumes.get(mounts.get('/dev/fuse').name).hostPath.type).toBe('CharDevice');
    // The readiness probe uses the installed wait helper at the image's install path.
    expect(c.readinessProbe.exec.command.slice(0, 3)).toEqual([
      '/usr/local/bin/node',
      '/usr/local/lib/gear/libexec/wait-socket.cjs',
      '/run/gear/snapshotter.sock',
    ]);
    // The socket is the one the containerd drop-in names.
    const dropin = readFileSync(join(REPO_ROOT, 'packaging/containerd/gear.toml.in'), 'utf8');
    expect(dropin).toContain(`address = "${execStart[execStart.indexOf('--socket') + 1]}"`);
  });
});
