/** On/off settings as environment variables give them (GEAR_REQUIRE_LAZY, GEAR_BACKGROUND_FETCH). */
import { failedPrecondition } from './errors.js';

/** 1/true/yes/on or 0/false/no/off/empty (unset); anything else fails, naming the setting. */
export function parseSwitch(value: string | undefined, name: string): boolean {
  const v = (value ?? '').trim().toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['', '0', 'false', 'no', 'off'].includes(v)) return false;
  throw failedPrecondition(`${name}=${JSON.stringify(value)}: expected true or false`);
}
