/**
 * The default StoreOpener: the core's overlay layer store. Imported lazily so
 * that loading the frontend (e.g. in protocol tests with a fake store) does
 * not load the store and its archive/mount machinery.
 */
import type { StoreOpener } from './driver.js';

export const openCoreLayerStore: StoreOpener = async (opts) => {
  const { openLayerStore } = await import('../../core/layers/store.js');
  return openLayerStore({ ...opts.options, root: opts.root, logger: opts.logger });
};
