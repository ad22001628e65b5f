/**
 * The uncompressed input of a conversion: the sizes of the layer tars a
 * `docker save` archive holds (the Layers of its manifest.json), summed. The
 * conversion throughput of issue 15 (>= 100 MB/s) is this over the seconds
 * of `gear convert`.
 */
import { runOk } from '../../test/helpers/proc.js';

export async function archiveInputBytes(archive: string): Promise<number> {
  const manifest = await runOk('tar', ['-xOf', archive, 'manifest.json'], { timeoutMs: 120_000 });
  const doc = JSON.parse(manifest.stdout) as { Layers?: string[] }[];
  const layers = new Set(doc.flatMap((m) => (Array.isArray(m.Layers) ? m.Layers : [])).map((p) => p.replace(/^\.\//, '')));
  const list = await runOk('tar', ['-tvf', archive], { timeoutMs: 120_000 });
  let total = 0;
  // -rw-r--r-- 0/0   128307200 2026-12-06 20:17 <path>
  for (const line of list.stdout.split('\n')) {
    const m = /^\S+\s+\S+\s+(\d+)\s+\S+\s+\S+\s+(.+)$/.exec(line);
    if (m && layers.has(m[2]!.replace(/^\.\//, ''))) total += Number(m[1]);
  }
  if (total === 0) throw new Error(`${archive}: no layer tar of manifest.json found in the archive listing`);
  return total;
}
