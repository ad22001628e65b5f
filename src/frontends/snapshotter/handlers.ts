/**
 * The two shapes of snapshotter gRPC handler (unary, server stream), built so
 * that every call ends with a reply or a status: a failure of the work, of
 * turning its result into wire messages, or of writing them reaches the
 * caller as a status, never as an unhandled rejection that leaves the call
 * hanging until its deadline. One log line per call.
 */
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import { toServiceError } from './errors.js';

type AnyCall = grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>;

export const namespaceOf = (call: AnyCall): string => String(call.metadata.get('containerd-namespace')[0] ?? '');

function fail(log: Logger, fields: Record<string, unknown>, err: unknown): Partial<grpc.ServiceError> {
  const e = toServiceError(err);
  log[e.code === grpc.status.UNKNOWN ? 'error' : 'debug']({ ...fields, code: e.code, err: e.details }, 'call failed');
  return e;
}

/** A unary handler: `fn` returns the wire reply (its errors and throws become the status). */
export function unaryHandler<Req, Res>(log: Logger, rpc: string, fn: (req: Req) => Promise<Res>): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    const started = performance.now();
    const req = call.request as Req & { key?: string; name?: string };
    const fields = { rpc, ns: namespaceOf(call), key: req.key ?? req.name };
    let answered = false;
    const answer = (err: Partial<grpc.ServiceError> | null, res?: Res): void => {
      if (answered) return;
      answered = true;
      callback(err, res);
    };
    Promise.resolve()
      .then(() => fn(call.request))
      .then((res) => {
        log.debug({ ...fields, ms: Math.round(performance.now() - started) }, 'call');
        answer(null, res);
      })
      .catch((err: unknown) => answer(fail(log, fields, err)));
  };
}

/**
 * A server-stream handler: `fn` returns the messages to send (built before
 * the first is written, so a failure there is still a clean status).
 */
export function streamHandler<Req, Msg>(log: Logger, rpc: string, fn: (req: Req) => Promise<Msg[]>): grpc.handleServerStreamingCall<Req, Msg> {
  return (call) => {
    const fields = { rpc, ns: namespaceOf(call) };
    let ended = false;
    const end = (err?: Partial<grpc.ServiceError>): void => {
      if (ended) return;
      ended = true;
      if (err) call.emit('error', err);
      else call.end();
    };
    Promise.resolve()
      .then(() => fn(call.request))
      .then((msgs) => {
        for (const m of msgs) {
          if (call.cancelled) return end();
          call.write(m);
        }
        log.debug({ ...fields, messages: msgs.length }, 'call');
        end();
      })
      .catch((err: unknown) => end(fail(log, fields, err)));
  };
}
