/**
 * Gear index layers for tests that drive a gear daemon directly: push the
 * files' blobs to a (real) registry, and build the index layer tar that
 * ApplyDiff takes, pointing at `registryHost` (e.g. a fault proxy in front of
 * the registry).
 */
import { createHash } from 'node:crypto';
import { writeIndexLayer } from '../../src/core/index/index-layer.js';
import type { IndexManifest } from '../../src/core/index/manifest.js';
import { RegistryClient } from '../../src/core/registry/client.js';
import { indexTarHeader } from '../unit/fixtures/tarbuild.js';

export const sha256hex = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Pushes each file's content as a blob of host/repo. */
export async function pushFiles(host: string, repo: string, files: Record<string, Buffer>): Promise<void> {
  const pusher = new RegistryClient();
  try {
    for (const c of Object.values(files)) await pusher.pushBlob(`${host}/${repo}`, `sha256:${sha256hex(c)}`, c);
  } finally {
    await pusher.close();
  }
}

/** An index layer tar (format version 1) holding `files` (paths like "data/a") under their directories. */
export async function indexLayerTar(registryHost: string, repo: string, files: Record<string, Buffer>): Promise<Buffer> {
  const manifest: IndexManifest = {
    version: 1,
    location: { registry: registryHost, repository: repo },
    files: Object.entries(files)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)) // the format wants them in path order
      .map(([p, c]) => ({ path: p, digest: `sha256:${sha256hex(c)}`, size: c.length })),
  };
  const dirs = new Set<string>();
  for (const p of Object.keys(files)) {
    const parts = p.split('/');
    for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
  }
  // One list in path order: each directory right before what it holds.
  const entries = [...[...dirs].map((d) => [d, 'dir'] as const), ...Object.keys(files).map((p) => [p, 'file'] as const)]
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([p, type]) => indexTarHeader(p, type));
  const chunks: Buffer[] = [];
  for await (const c of writeIndexLayer(manifest, entries)) chunks.push(c);
  return Buffer.concat(chunks);
}

/** The path of a blob in the miss filesystem (or the pool) under dir. */
export const blobPath = (dir: string, content: Buffer) => {
  const h = sha256hex(content);
  return `${dir}/sha256/${h.slice(0, 2)}/${h}`;
};
