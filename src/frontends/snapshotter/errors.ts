/**
 * The one place where the core's error classes become gRPC status codes.
 * containerd maps the codes back (errdefs.FromGRPC), so the class is part of
 * the protocol: NOT_FOUND lets the unpacker proceed, FAILED_PRECONDITION is
 * what GC tolerates for a snapshot with children, ALREADY_EXISTS from Prepare
 * means "remote snapshot already committed" (protocols.md C.3, C.5).
 */
import { status, type ServiceError } from '@grpc/grpc-js';
import { describeError, errorClass, type ErrorClass } from '../../core/errors.js';

export const STATUS_BY_CLASS: Record<ErrorClass, status> = {
  NotFound: status.NOT_FOUND,
  AlreadyExists: status.ALREADY_EXISTS,
  InvalidArgument: status.INVALID_ARGUMENT,
  FailedPrecondition: status.FAILED_PRECONDITION,
  Unavailable: status.UNAVAILABLE,
  DeadlineExceeded: status.DEADLINE_EXCEEDED,
  PermissionDenied: status.PERMISSION_DENIED,
  Unimplemented: status.UNIMPLEMENTED,
  // containerd maps every code it does not know to Unknown anyway.
  Internal: status.UNKNOWN,
};

/** A thrown value as a gRPC error: code from the class, message with its causes. */
export function toServiceError(err: unknown): Partial<ServiceError> {
  return { code: STATUS_BY_CLASS[errorClass(err)], details: describeError(err) };
}
