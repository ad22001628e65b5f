// Blob uploads per second that docker-registry takes (what bounds gear convert:
// one upload per distinct file). Starts its own registry on 127.0.0.1 with a temp
// root; not part of make bench. Needs dist/ (npx tsc) and /usr/bin/docker-registry.
//   node bench/micro/registry-upload.mjs 1 4 16
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RegistryClient } from '../../dist/core/registry/client.js';

const root = mkdtempSync(join(tmpdir(), 'gear-reg-'));
const port = 20000 + Math.floor(Math.random() * 20000);
writeFileSync(
  join(root, 'config.yml'),
  `version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${root}/data\nhttp:\n  addr: 127.0.0.1:${port}\n`,
);
const reg = spawn('/usr/bin/docker-registry', ['serve', join(root, 'config.yml')], { stdio: 'ignore' });
const host = `127.0.0.1:${port}`;
const client = new RegistryClient({ insecureRegistries: [host] });
try {
  for (let i = 0; i < 50; i++) {
    if (await fetch(`http://${host}/v2/`).then((r) => r.ok, () => false)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  for (const par of process.argv.slice(2).map(Number)) {
    const blobs = Array.from({ length: 200 }, () => randomBytes(3000));
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: par }, async () => {
        while (next < blobs.length) {
          const b = blobs[next++];
          await client.pushBlob(`${host}/micro/x`, `sha256:${createHash('sha256').update(b).digest('hex')}`, b);
        }
      }),
    );
    console.log(`${par} in flight: ${((performance.now() - t0) / blobs.length).toFixed(1)} ms per 3 kB blob upload`);
  }
} finally {
  await client.close();
  reg.kill('SIGTERM');
  await new Promise((r) => reg.once('exit', r));
  rmSync(root, { recursive: true, force: true });
}
