/**
 * The real `gear daemon` process (dist/cli/gear.js, so `npx tsc -p
 * tsconfig.json` first) on a socket and root of its own, and the raw HTTP
 * calls dockerd makes to it. For tests that must see the daemon survive
 * (an uncaught exception exits the process; an in-process server would take
 * the test runner down instead).
 *
 * Rules: every wait is bounded; only the PID we spawned is signalled.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { GEAR_CLI } from './dockerd.js';

export const PLUGIN_MIME = 'application/vnd.docker.plugins.v1.2+json';

export interface GearDaemon {
  readonly socket: string;
  readonly root: string;
  readonly pid: number;
  /** True while the process has not exited. */
  alive(): boolean;
  /** How it exited (once it did). */
  exit(): { code: number | null; signal: NodeJS.Signals | null } | undefined;
  /** Everything it wrote to stderr and stdout (its log). */
  log(): string;
  /** SIGTERM, then SIGKILL after 10 s; resolves once it exited. */
  stop(): Promise<void>;
}

export async function startGearDaemon(opts: { dir: string; env?: Record<string, string>; args?: string[] }): Promise<GearDaemon> {
  if (!existsSync(GEAR_CLI)) throw new Error(`${GEAR_CLI} is missing: build with npx tsc -p tsconfig.json first`);
  const socket = path.join(opts.dir, 'gear.sock');
  const root = path.join(opts.dir, 'root');
  const child: ChildProcess = spawn(
    process.execPath,
    [GEAR_CLI, 'daemon', '--socket', socket, '--root', root, '--no-lazy', '--log-level', 'warn', ...(opts.args ?? [])],
    { env: { ...process.env, ...opts.env }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
  let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  const exitedP = new Promise<void>((resolve) =>
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      resolve();
    }),
  );
  const deadline = Date.now() + 30_000;
  while (!(await answers(socket))) {
    if (exited) throw new Error(`gear daemon exited at start (${JSON.stringify(exited)}): ${out}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`gear daemon did not listen on ${socket} within 30 s: ${out}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    socket,
    root,
    pid: child.pid!,
    alive: () => exited === undefined,
    exit: () => exited,
    log: () => out,
    stop: async () => {
      if (exited) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exitedP;
      clearTimeout(timer);
    },
  };
}

function answers(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    if (!existsSync(socket)) return resolve(false);
    const c = net.connect(socket);
    c.once('connect', () => {
      c.destroy();
      resolve(true);
    });
    c.once('error', () => resolve(false));
  });
}

export interface RawReply {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
  /** The connection ended before a complete reply (or the time bound passed). */
  cut: boolean;
}

/**
 * Sends raw bytes on a fresh connection and reads one HTTP/1.1 reply (the
 * connection is closed after it). `bytes` may be a function that writes
 * (and may never end) on its own. Bounded by timeoutMs.
 */
export function rawRequest(socket: string, bytes: Buffer | string | ((c: net.Socket) => void), timeoutMs = 15_000): Promise<RawReply> {
  return new Promise((resolve) => {
    const c = net.connect(socket);
    const chunks: Buffer[] = [];
    let settled = false;
    const finish = (cut: boolean): void => {
      if (settled) return;
      const parsed = parseReply(Buffer.concat(chunks));
      if (!parsed && !cut) return; // incomplete; wait for more
      settled = true;
      clearTimeout(timer);
      c.destroy();
      resolve(parsed ? { ...parsed, cut: false } : { status: 0, headers: {}, body: Buffer.concat(chunks), cut: true });
    };
    const timer = setTimeout(() => finish(true), timeoutMs);
    c.on('data', (b: Buffer) => {
      chunks.push(b);
      finish(false);
    });
    c.once('end', () => finish(true));
    c.once('close', () => finish(true));
    c.once('error', () => finish(true));
    c.once('connect', () => {
      if (typeof bytes === 'function') bytes(c);
      else c.write(bytes);
    });
  });
}

/** A complete HTTP reply with Content-Length (or chunked) framing, else undefined. */
function parseReply(buf: Buffer): Omit<RawReply, 'cut'> | undefined {
  const end = buf.indexOf('\r\n\r\n');
  if (end < 0) return undefined;
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '');
  if (!m) return undefined;
  const headers: Record<string, string> = {};
  for (const l of lines.slice(1)) {
    const i = l.indexOf(':');
    if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  const rest = buf.subarray(end + 4);
  if (headers['content-length'] !== undefined) {
    const n = Number(headers['content-length']);
    if (rest.length < n) return undefined;
    return { status: Number(m[1]), headers, body: rest.subarray(0, n) };
  }
  if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
    const parts: Buffer[] = [];
    let off = 0;
    for (;;) {
      const nl = rest.indexOf('\r\n', off);
      if (nl < 0) return undefined;
      const size = parseInt(rest.subarray(off, nl).toString('latin1'), 16);
      if (Number.isNaN(size)) return undefined;
      if (size === 0) return { status: Number(m[1]), headers, body: Buffer.concat(parts) };
      if (rest.length < nl + 2 + size + 2) return undefined;
      parts.push(rest.subarray(nl + 2, nl + 2 + size));
      off = nl + 2 + size + 2;
    }
  }
  return undefined;
}

/** A POST as dockerd sends it: no Content-Type, Content-Length framing. */
export function post(pathAndQuery: string, body: Buffer | string, extraHeaders: string[] = []): Buffer {
  const b = Buffer.isBuffer(body) ? body : Buffer.from(body);
  const head = [
    `POST ${pathAndQuery} HTTP/1.1`,
    'Host: plugin',
    `Accept: ${PLUGIN_MIME}`,
    `Content-Length: ${b.length}`,
    'Connection: close',
    ...extraHeaders,
    '',
    '',
  ].join('\r\n');
  return Buffer.concat([Buffer.from(head, 'latin1'), b]);
}
