/**
 * Does the pool's filesystem support fs-verity? An honest probe, changing
 * nothing: FS_IOC_MEASURE_VERITY on a regular file of the pool's filesystem.
 *
 * - ENODATA: the kernel and the filesystem support fs-verity (the file simply
 *   has none enabled);
 * - EOPNOTSUPP: the kernel lacks CONFIG_FS_VERITY, or the filesystem lacks the
 *   feature (ext4: `tune2fs -O verity`); /proc/config.gz and
 *   /sys/fs/ext4/features/verity tell which, when present;
 * - ENOTTY (or EINVAL): the filesystem does not know the ioctl (tmpfs, xfs…).
 *
 * Gear does not enforce fs-verity yet (docs/pool-integrity.md says what it
 * would take); the probe only feeds the status line, so that an operator sees
 * which protection is active: the scrub, and whether fs-verity could be.
 */
import { gunzipSync } from 'node:zlib';
import { readFileSync, existsSync, statfsSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { errnoCode } from '../errors.js';
import { native } from '../sys/native.js';

export interface VerityProbe {
  /** true when fs-verity could be enabled on pool files */
  supported: boolean;
  /** for people: why (not) */
  detail: string;
  /** the ioctl's answer ('ok' when a file already had fs-verity) */
  answer: string;
}

const FS_NAMES: Record<number, string> = { 0xef53: 'ext4', 0x58465342: 'xfs', 0x9123683e: 'btrfs', 0x01021994: 'tmpfs', 0xf2f52010: 'f2fs', 0x794c7630: 'overlayfs' };

/** CONFIG_FS_VERITY from /proc/config.gz: true, false, or undefined when the kernel does not publish its config. */
export function kernelConfigHasVerity(configGz = '/proc/config.gz'): boolean | undefined {
  try {
    const text = gunzipSync(readFileSync(configGz)).toString('latin1');
    if (/^CONFIG_FS_VERITY=y$/m.test(text)) return true;
    if (/^# CONFIG_FS_VERITY is not set$/m.test(text) || !/CONFIG_FS_VERITY/.test(text)) return false;
    return undefined;
  } catch {
    return undefined;
  }
}

function fsName(dir: string): string {
  try {
    const t = statfsSync(dir).type;
    return FS_NAMES[t] ?? `filesystem 0x${t.toString(16)}`;
  } catch {
    return 'unknown filesystem';
  }
}

/** Interprets the ioctl's error code (exported for tests). */
export function describeVerityAnswer(code: string, fs: string, kernel: boolean | undefined, ext4Feature: boolean): VerityProbe {
  if (code === 'ENODATA') return { supported: true, answer: code, detail: `supported by this kernel and ${fs} (not enabled on pool files: Gear does not enforce it yet)` };
  if (code === 'EOPNOTSUPP' || code === 'ENOTSUP') {
    if (kernel === false) return { supported: false, answer: code, detail: 'not supported by this kernel (CONFIG_FS_VERITY is not set)' };
    if (fs === 'ext4' && (kernel === true || ext4Feature)) {
      return { supported: false, answer: code, detail: 'not enabled on the pool filesystem (ext4 without the verity feature: tune2fs -O verity)' };
    }
    return { supported: false, answer: code, detail: `not supported by this kernel or by ${fs}` };
  }
  if (code === 'ENOTTY' || code === 'EINVAL') return { supported: false, answer: code, detail: `not supported by ${fs}` };
  return { supported: false, answer: code, detail: `unknown (FS_IOC_MEASURE_VERITY answered ${code})` };
}

/**
 * Probes with a file of `dir` (its filesystem is the pool's). `probeFile`: an
 * existing regular file to measure; without one a temporary file is created
 * in `dir` (which must then be writable) and removed.
 */
export async function probeFsVerity(dir: string, probeFile?: string): Promise<VerityProbe> {
  let file = probeFile;
  let temp: string | undefined;
  if (!file) {
    temp = path.join(dir, `.verity-probe.${process.pid}.${Date.now()}`);
    await fs.writeFile(temp, 'gear fs-verity probe\n', { mode: 0o600 });
    file = temp;
  }
  try {
    const fh = await fs.open(file, 'r');
    try {
      native.fsverityMeasure(fh.fd);
      return { supported: true, answer: 'ok', detail: 'supported (a probed file has fs-verity enabled)' };
    } catch (err) {
      return describeVerityAnswer(errnoCode(err) ?? String(err), fsName(dir), kernelConfigHasVerity(), existsSync('/sys/fs/ext4/features/verity'));
    } finally {
      await fh.close();
    }
  } finally {
    if (temp) await fs.rm(temp, { force: true });
  }
}
