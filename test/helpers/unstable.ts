/**
 * Where scripts/install-unstable.sh unpacks Debian unstable's packages (docker.io 28, containerd 2.1, their Go
 * sources, Go 1.27, the CRI api.proto): GEAR_UNSTABLE_ROOT, else GEAR_TEST_CACHE/unstable/root.
 */
import { join } from 'node:path';

export const UNSTABLE_ROOT = process.env.GEAR_UNSTABLE_ROOT ?? join(process.env.GEAR_TEST_CACHE ?? '/var/cache/gear-test', 'unstable/root');
