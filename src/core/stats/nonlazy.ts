/**
 * Containers started on an image that is not a Gear image: nothing of it is
 * lazy or deduplicated, which an operator who converted their images wants to
 * hear loudly (a warning in the log, a `docker info` line, a metric), and may
 * want refused (`--require-lazy`, GEAR_REQUIRE_LAZY).
 *
 * The frontends decide what is a container (graph driver: the first
 * read-write layer of a container, its -init layer, on an image's layer;
 * snapshotter: an active snapshot that is not an image unpack); the store
 * says whether the parent chain holds a Gear index layer.
 */
import { failedPrecondition } from '../errors.js';
import { parseSwitch } from '../switch.js';
import type { Logger } from '../log.js';

export interface NonLazyContainer {
  /** The container's layer id or snapshot key. */
  id: string;
  /** How the frontend names the image: the parent layer or snapshot, and the chain's depth. */
  image: string;
  /** Layers in the parent chain. */
  layers: number;
}

export interface NonLazyState {
  requireLazy: boolean;
  /** Containers started (or refused) on a non-Gear image since the daemon started. */
  started: number;
  refused: number;
  last?: NonLazyContainer & { at: number };
}

export const REQUIRE_LAZY_ENV = 'GEAR_REQUIRE_LAZY';

/** GEAR_REQUIRE_LAZY's value: 1/true/yes/on or 0/false/no/off/empty. */
export function parseRequireLazy(value: string | undefined): boolean {
  return parseSwitch(value, REQUIRE_LAZY_ENV);
}

function describe(c: NonLazyContainer): string {
  return `container ${c.id} on image ${c.image || '(no image: an empty root)'} (${c.layers} layer${c.layers === 1 ? '' : 's'}, none of them a Gear index layer)`;
}

export class NonLazyContainers {
  readonly requireLazy: boolean;
  private started = 0;
  private refused = 0;
  private last: (NonLazyContainer & { at: number }) | undefined;
  private readonly log: Logger | undefined;

  constructor(opts: { requireLazy?: boolean; logger?: Logger }) {
    this.requireLazy = opts.requireLazy ?? false;
    this.log = opts.logger;
  }

  /**
   * A container is about to be created on an image without a Gear index
   * layer: with --require-lazy it is refused here (the caller has created
   * nothing yet); otherwise the caller creates it and then calls note().
   */
  admit(c: NonLazyContainer): void {
    if (this.requireLazy) {
      const what = describe(c);
      this.last = { ...c, at: Date.now() };
      this.refused++;
      this.log?.warn({ container: c.id, image: c.image, layers: c.layers }, `refused ${what}: --require-lazy is set`);
      throw failedPrecondition(
        `gear: refusing ${what}: this image is not a Gear image and the daemon runs with --require-lazy (GEAR_REQUIRE_LAZY); ` +
          'convert the image with `gear convert SOURCE DEST` and run the converted one, or drop --require-lazy to allow ordinary images',
      );
    }
  }

  /** Such a container was created: counted and warned about. */
  note(c: NonLazyContainer): void {
    const what = describe(c);
    this.last = { ...c, at: Date.now() };
    this.started++;
    this.log?.warn(
      { container: c.id, image: c.image, layers: c.layers },
      `NON-LAZY CONTAINER: ${what}; it is pulled and stored whole, nothing of it is lazy or deduplicated (convert it with gear convert)`,
    );
  }

  state(): NonLazyState {
    return { requireLazy: this.requireLazy, started: this.started, refused: this.refused, ...(this.last ? { last: { ...this.last } } : {}) };
  }

  /** `docker info` lines. */
  status(): Array<[string, string]> {
    const last = this.last ? ` (last: ${this.last.id.slice(0, 12)} on ${this.last.image.slice(0, 24) || 'an empty root'})` : '';
    return [
      ['Require Lazy', this.requireLazy ? 'on (containers on non-Gear images are refused)' : 'off (--require-lazy)'],
      ['Non-Gear Containers', `${this.started} started, ${this.refused} refused${last}`],
    ];
  }
}
