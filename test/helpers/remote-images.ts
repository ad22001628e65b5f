/**
 * Images and checks shared by the remote-snapshot tests
 * (test/integration/remote-snapshots*.test.ts): an ordinary three-layer
 * image (busybox, files, a whiteout) pushed as is, the command that checks
 * its flattened content in a container, and a counter of blob downloads.
 */
import { createHash, randomBytes } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { RegistryClient } from '../../src/core/registry/client.js';
import { transferUnpackConfig } from './containerd.js';
import { buildLayers, busyboxLayer, imageConfig, type LayerEntry } from './oci-images.js';

const sha = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

/**
 * containerd 2.1 config appended right after `[proxy_plugins.gear]`: gear exports the remote-snapshot switch, then the
 * transfer service's unpack_config (start the harness with transferUnpack: false so it is written once).
 */
export const REMOTE_SNAPSHOT_CONFIG = `  exports = { enable_remote_snapshot_annotations = "true" }

${transferUnpackConfig()}`;

export const big = randomBytes(300_000);
export const layersOf = async (): Promise<LayerEntry[][]> => [
  await busyboxLayer(),
  [
    { path: 'etc/', type: 'dir' },
    { path: 'etc/app.conf', content: 'version=1\n' },
    { path: 'opt/', type: 'dir' },
    { path: 'opt/data/', type: 'dir' },
    { path: 'opt/data/big', content: big },
    { path: 'usr/', type: 'dir' },
    { path: 'usr/lib/', type: 'dir' },
    { path: 'usr/lib/gone', content: 'whited out above' },
    { path: 'usr/lib/kept', content: 'kept\n' },
  ],
  [
    { path: 'etc/', type: 'dir' },
    { path: 'etc/app.conf', content: 'version=2\n' },
    { path: 'usr/lib/', type: 'dir' },
    { path: 'usr/lib/.wh.gone', content: '' },
  ],
];
export const CHECK = ['/bin/busybox', 'sh', '-c', 'cat /etc/app.conf; ls /usr/lib; /bin/busybox sha256sum /opt/data/big | cut -c1-64'];
export const expected = () => `version=2\nkept\n${createHash('sha256').update(big).digest('hex')}\n`;

/** Pushes an ordinary multi-layer image; returns its manifest digest and layer digests. */
export async function pushPlainImage(host: string, repo: string, tag: string, layers: LayerEntry[][]): Promise<{ digest: string; size: number; layers: string[] }> {
  const client = new RegistryClient();
  try {
    const built = await buildLayers(layers);
    const descs = [];
    for (const l of built) {
      const gz = gzipSync(l.tar);
      await client.pushBlob(`${host}/${repo}`, sha(gz), gz);
      descs.push({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: sha(gz), size: gz.length });
    }
    const cfg = imageConfig(built.map((l) => l.diffId));
    await client.pushBlob(`${host}/${repo}`, sha(cfg), cfg);
    const manifest = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.manifest.v1+json',
        config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha(cfg), size: cfg.length },
        layers: descs,
      }),
    );
    await client.putManifest(`${host}/${repo}:${tag}`, manifest);
    return { digest: sha(manifest), size: manifest.length, layers: descs.map((d) => d.digest) };
  } finally {
    await client.close();
  }
}

export const blobGets = (seen: string[], digests: string[]) => seen.filter((l) => l.startsWith('GET ') && digests.some((d) => l.includes(`/blobs/${d}`)));

