/**
 * The error vocabulary of the core. A small set of classes, not one type per
 * call site: every frontend maps a class to its wire form in exactly one place
 * (graph-driver `Err` prefix, gRPC status code, CLI exit message).
 *
 * Wrap with context, keep the class: `new GearError('NotFound', `layer ${id}: ...`, { cause })`.
 */
export type ErrorClass =
  | 'NotFound'
  | 'AlreadyExists'
  | 'InvalidArgument'
  | 'FailedPrecondition'
  | 'Unavailable'
  | 'DeadlineExceeded'
  | 'PermissionDenied'
  | 'Unimplemented'
  | 'Internal';

export class GearError extends Error {
  readonly class: ErrorClass;

  constructor(cls: ErrorClass, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'GearError';
    this.class = cls;
  }
}

export const notFound = (msg: string, cause?: unknown) => new GearError('NotFound', msg, { cause });
export const alreadyExists = (msg: string, cause?: unknown) => new GearError('AlreadyExists', msg, { cause });
export const invalidArgument = (msg: string, cause?: unknown) => new GearError('InvalidArgument', msg, { cause });
export const failedPrecondition = (msg: string, cause?: unknown) =>
  new GearError('FailedPrecondition', msg, { cause });
export const unavailable = (msg: string, cause?: unknown) => new GearError('Unavailable', msg, { cause });
export const deadlineExceeded = (msg: string, cause?: unknown) => new GearError('DeadlineExceeded', msg, { cause });
export const internal = (msg: string, cause?: unknown) => new GearError('Internal', msg, { cause });

/** The class of any thrown value; errors that are not GearErrors are Internal. */
export function errorClass(err: unknown): ErrorClass {
  return err instanceof GearError ? err.class : 'Internal';
}

/** True when err is a GearError of the given class. */
export function isClass(err: unknown, cls: ErrorClass): boolean {
  return err instanceof GearError && err.class === cls;
}

/** The errno code of a Node/native system error ("ENOENT"…), or undefined. */
export function errnoCode(err: unknown): string | undefined {
  if (err && typeof err === 'object' && 'code' in err && typeof (err as { code: unknown }).code === 'string') {
    return (err as { code: string }).code;
  }
  return undefined;
}

/** A one-line description of err including its causes, for logs and wire messages. */
export function describeError(err: unknown): string {
  const parts: string[] = [];
  let cur: unknown = err;
  for (let depth = 0; cur !== undefined && cur !== null && depth < 5; depth++) {
    const msg = cur instanceof Error ? cur.message : String(cur);
    if (!parts.some((p) => p.includes(msg))) parts.push(msg);
    cur = cur instanceof Error ? (cur as Error & { cause?: unknown }).cause : undefined;
  }
  return parts.join(': ');
}
