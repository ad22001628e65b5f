/**
 * A small Kubernetes CRI client (runtime.v1 RuntimeService and ImageService)
 * for the tests: @grpc/grpc-js with the CRI's own api.proto, loaded at run
 * time by @grpc/proto-loader from Debian's golang-k8s-cri-api-dev (in the
 * unstable tree of scripts/install-unstable.sh). Nothing is generated or
 * vendored: the calls are exactly the proto's, with its field names
 * (keepCase), int64 as strings and enums as their names.
 *
 * Older releases of api.proto import gogo protobuf's options
 * (github.com/gogo/protobuf/gogoproto/gogo.proto): the include path holds the
 * Go source trees, where golang-github-gogo-protobuf-dev (in the unstable tree
 * and in Debian 12's /usr/share/gocode) has it.
 *
 * ```ts
 * const cri = await CriClient.connect('/tmp/x/containerd.sock');
 * const { runtime_version } = await cri.runtime('Version', {});
 * await cri.image('PullImage', { image: { image: 'docker.io/library/busybox:1' } });
 * cri.close();
 * ```
 */
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { UNSTABLE_ROOT } from './unstable.js';

/** The Debian-unstable tree of scripts/install-unstable.sh. */
export { UNSTABLE_ROOT };
const GOCODE_SRC = join(UNSTABLE_ROOT, 'usr/share/gocode/src');
/** k8s.io/cri-api's runtime/v1 api.proto, as golang-k8s-cri-api-dev ships it. */
export const CRI_API_PROTO = process.env.GEAR_CRI_API_PROTO ?? join(GOCODE_SRC, 'k8s.io/cri-api/pkg/apis/runtime/v1/api.proto');

/**
 * Include dirs for api.proto: its own dir and the Go source trees, where
 * golang-github-gogo-protobuf-dev puts github.com/gogo/protobuf/gogoproto/gogo.proto
 * (some api.proto releases import its options; they only steer Go code
 * generation and carry nothing on the wire). google/protobuf/* come with proto-loader.
 */
function includeDirs(proto: string): string[] {
  return [dirname(proto), GOCODE_SRC, '/usr/share/gocode/src'].filter((d) => existsSync(d));
}

/** Plain objects in and out; the proto's own field names. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type CriMessage = Record<string, any>;

type Unary = (req: CriMessage, meta: grpc.Metadata, opts: grpc.CallOptions, cb: (err: grpc.ServiceError | null, res?: CriMessage) => void) => void;
type Stub = grpc.Client & Record<string, Unary>;

export class CriError extends Error {
  constructor(
    readonly method: string,
    readonly code: grpc.status,
    readonly details: string,
  ) {
    super(`CRI ${method}: ${grpc.status[code] ?? code}: ${details}`);
  }
}

export class CriClient {
  private constructor(
    private readonly runtimeStub: Stub,
    private readonly imageStub: Stub,
    /** Default deadline of one call. */
    readonly timeoutMs: number,
  ) {}

  /**
   * Loads api.proto and connects to a CRI endpoint (containerd's gRPC socket).
   * Waits (bounded) until the channel is ready.
   */
  static async connect(socket: string, opts: { proto?: string; timeoutMs?: number } = {}): Promise<CriClient> {
    const proto = opts.proto ?? CRI_API_PROTO;
    if (!existsSync(proto)) throw new Error(`${proto} is missing: run scripts/install-unstable.sh (golang-k8s-cri-api-dev)`);
    const def = await protoLoader.load(proto, {
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
      includeDirs: includeDirs(proto),
    });
    const pkg = grpc.loadPackageDefinition(def) as unknown as {
      runtime: { v1: { RuntimeService: grpc.ServiceClientConstructor; ImageService: grpc.ServiceClientConstructor } };
    };
    const v1 = pkg.runtime?.v1;
    if (!v1?.RuntimeService || !v1.ImageService) throw new Error(`${proto} does not define runtime.v1.RuntimeService and ImageService`);
    const target = `unix://${socket}`;
    const creds = grpc.credentials.createInsecure();
    const chanOpts = { 'grpc.max_receive_message_length': 16 << 20 };
    const runtime = new v1.RuntimeService(target, creds, chanOpts) as unknown as Stub;
    const image = new v1.ImageService(target, creds, chanOpts) as unknown as Stub;
    const timeoutMs = opts.timeoutMs ?? 120_000;
    try {
      for (const c of [runtime, image]) {
        await new Promise<void>((resolve, reject) =>
          c.waitForReady(Date.now() + 30_000, (err) => (err ? reject(new Error(`CRI endpoint ${socket} not ready: ${err.message}`)) : resolve())),
        );
      }
    } catch (err) {
      runtime.close();
      image.close();
      throw err;
    }
    return new CriClient(runtime, image, timeoutMs);
  }

  private call(stub: Stub, method: string, req: CriMessage, timeoutMs = this.timeoutMs): Promise<CriMessage> {
    const fn = stub[method];
    if (typeof fn !== 'function') return Promise.reject(new Error(`CRI has no method ${method}`));
    return new Promise((resolve, reject) => {
      fn.call(stub, req, new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
        if (err) reject(new CriError(method, err.code, err.details));
        else resolve(res ?? {});
      });
    });
  }

  /** A RuntimeService call (Version, RunPodSandbox, CreateContainer, ExecSync, …). */
  runtime(method: string, req: CriMessage, timeoutMs?: number): Promise<CriMessage> {
    return this.call(this.runtimeStub, method, req, timeoutMs);
  }

  /** An ImageService call (PullImage, ListImages, ImageStatus, RemoveImage, ImageFsInfo). */
  image(method: string, req: CriMessage, timeoutMs?: number): Promise<CriMessage> {
    return this.call(this.imageStub, method, req, timeoutMs);
  }

  close(): void {
    this.runtimeStub.close();
    this.imageStub.close();
  }
}
