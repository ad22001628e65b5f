/**
 * What the bench registry serves, for the cold-deploy comparison (issue 11):
 *
 * - AccessLog: the registry's access log (distribution writes one combined-log
 *   line per request on stdout); requests and response bytes between two marks,
 *   i.e. the HTTP requests one deploy made.
 * - storageOf: registry storage of one system's copy of the corpus: the unique
 *   blobs (manifests, configs, layers; for Gear also the keep-alive manifests
 *   and the Gear files they reference) reachable from a set of tags, summed.
 *
 * Registry answers are trusted only as far as counting goes: bodies are parsed
 * as JSON with bounded sizes, digests are taken from the descriptors.
 */
import { closeSync, existsSync, openSync, readSync, statSync } from 'node:fs';

export class AccessLog {
  constructor(readonly file: string) {}

  mark(): number {
    return existsSync(this.file) ? statSync(this.file).size : 0;
  }

  /** Requests logged since mark (every method and status), and the response bytes they logged. */
  since(mark: number): { requests: number; bytes: number; byMethod: Record<string, number> } {
    const size = this.mark();
    const buf = Buffer.alloc(Math.max(0, size - mark));
    if (buf.length) {
      const fd = openSync(this.file, 'r');
      try {
        readSync(fd, buf, 0, buf.length, mark);
      } finally {
        closeSync(fd);
      }
    }
    let requests = 0;
    let bytes = 0;
    const byMethod: Record<string, number> = {};
    // 10.1.2.3 - - [date] "GET /v2/x/blobs/sha256:… HTTP/1.1" 206 50000 "" "Go-http-client/1.1"
    const re = /"([A-Z]+) (\/v2\/\S*) HTTP\/[\d.]+" (\d{3}) (\d+|-)/;
    for (const line of buf.toString('utf8').split('\n')) {
      const m = re.exec(line);
      if (!m) continue;
      requests++;
      byMethod[m[1]!] = (byMethod[m[1]!] ?? 0) + 1;
      if (m[4] !== '-') bytes += Number(m[4]);
    }
    return { requests, bytes, byMethod };
  }
}

const MANIFEST_TYPES = [
  'application/vnd.oci.image.manifest.v1+json',
  'application/vnd.oci.image.index.v1+json',
  'application/vnd.docker.distribution.manifest.v2+json',
  'application/vnd.docker.distribution.manifest.list.v2+json',
];

interface Descriptor {
  mediaType?: string;
  digest: string;
  size: number;
}

async function getJson(url: string, accept?: string[]): Promise<{ body: unknown; digest: string | null; size: number }> {
  const r = await fetch(url, { headers: accept ? { Accept: accept.join(', ') } : {}, signal: AbortSignal.timeout(60_000) });
  if (!r.ok) throw new Error(`GET ${url}: HTTP ${r.status}`);
  const text = await r.text();
  if (text.length > 64 * 1024 * 1024) throw new Error(`GET ${url}: answer over 64 MiB`);
  return { body: JSON.parse(text), digest: r.headers.get('docker-content-digest'), size: Buffer.byteLength(text) };
}

export interface Storage {
  blobs: number;
  bytes: number;
  manifests: number;
  tags: string[];
}

/**
 * Unique blobs reachable from repo:tag for each [repo, tag], plus (withKeepAlive)
 * the tags `sha256-<hex of the manifest>…` next to it (Gear's keep-alive
 * manifests and referrers fallback, docs/format.md). Manifests count as blobs.
 */
export async function storageOf(registry: string, refs: [string, string][], withKeepAlive: boolean): Promise<Storage> {
  const seen = new Map<string, number>();
  let manifests = 0;
  const tagsUsed: string[] = [];
  const tagLists = new Map<string, string[]>();
  const tagsOf = async (repo: string): Promise<string[]> => {
    if (!tagLists.has(repo)) {
      const { body } = await getJson(`http://${registry}/v2/${repo}/tags/list?n=10000`);
      tagLists.set(repo, ((body as { tags?: string[] }).tags ?? []).filter((t) => typeof t === 'string'));
    }
    return tagLists.get(repo)!;
  };
  const walk = async (repo: string, ref: string, depth: number): Promise<string> => {
    if (depth > 4) throw new Error(`${repo}@${ref}: manifests nested too deep`);
    const { body, digest, size } = await getJson(`http://${registry}/v2/${repo}/manifests/${ref}`, MANIFEST_TYPES);
    const d = digest ?? ref;
    manifests++;
    seen.set(d, size);
    const m = body as { config?: Descriptor; layers?: Descriptor[]; manifests?: Descriptor[] };
    for (const x of [...(m.config ? [m.config] : []), ...(m.layers ?? [])]) {
      if (typeof x?.digest === 'string' && Number.isFinite(x.size)) seen.set(x.digest, x.size);
    }
    for (const x of m.manifests ?? []) if (typeof x?.digest === 'string' && !seen.has(x.digest)) await walk(repo, x.digest, depth + 1);
    return d;
  };
  for (const [repo, tag] of refs) {
    const d = await walk(repo, tag, 0);
    tagsUsed.push(`${repo}:${tag}`);
    if (!withKeepAlive) continue;
    const prefix = `sha256-${d.replace(/^sha256:/, '')}`;
    for (const t of (await tagsOf(repo)).filter((x) => x.startsWith(prefix))) {
      await walk(repo, t, 0);
      tagsUsed.push(`${repo}:${t}`);
    }
  }
  return { blobs: seen.size, bytes: [...seen.values()].reduce((a, b) => a + b, 0), manifests, tags: tagsUsed };
}
