/**
 * Platform selection from an OCI index / Docker manifest list.
 */
import type { Descriptor, ImageIndex, Platform } from './media-types.js';

const ARCH: Record<string, string> = { x64: 'amd64', x86_64: 'amd64', ia32: '386', aarch64: 'arm64', ppc64: 'ppc64le' };

/** The host's platform in OCI terms: linux/amd64, linux/arm64/v8, linux/arm/v7… */
export function hostPlatform(): Platform {
  const architecture = ARCH[process.arch] ?? process.arch;
  const p: Platform = { os: 'linux', architecture };
  if (architecture === 'arm64') p.variant = 'v8';
  if (architecture === 'arm') {
    const v = (process.config.variables as { arm_version?: string }).arm_version;
    if (v) p.variant = `v${v}`;
  }
  return p;
}

export function formatPlatform(p: Platform | undefined): string {
  if (!p) return 'unknown';
  return [p.os, p.architecture, p.variant].filter(Boolean).join('/');
}

function normArch(a: string): string {
  return ARCH[a] ?? a;
}

function normVariant(arch: string, v: string | undefined): string | undefined {
  if (arch === 'arm64' && (v === undefined || v === '' || v === 'v8')) return 'v8';
  return v || undefined;
}

/**
 * Pick the manifest for `want` from an index: same os and architecture; the
 * exact variant when one is wanted (arm64's missing variant counts as v8),
 * otherwise the first match. Attestation manifests (unknown/unknown) are
 * never chosen. Returns undefined when nothing matches.
 */
export function selectPlatformManifest(index: ImageIndex, want: Platform): Descriptor | undefined {
  const wantArch = normArch(want.architecture);
  const wantVariant = normVariant(wantArch, want.variant);
  let fallback: Descriptor | undefined;
  for (const d of index.manifests) {
    const p = d.platform;
    if (!p || typeof p.os !== 'string' || typeof p.architecture !== 'string') continue;
    if (d.annotations?.['vnd.docker.reference.type'] === 'attestation-manifest') continue;
    if (p.os !== want.os || normArch(p.architecture) !== wantArch) continue;
    const v = normVariant(wantArch, p.variant);
    if (v === wantVariant) return d;
    if (!wantVariant && !fallback) fallback = d;
    if (wantVariant && v === undefined && !fallback) fallback = d;
  }
  return fallback;
}
