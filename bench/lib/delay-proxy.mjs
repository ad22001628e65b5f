// A TCP proxy that delays every chunk by a fixed time in each direction (order
// kept): `node delay-proxy.mjs LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS`.
// The cold-deploy benchmark runs it inside its network namespace, in front of
// the registry, for the "added RTT" link (this kernel has no netem).
import net from 'node:net';

const [listen, target, ms] = process.argv.slice(2);
const [lh, lp] = listen.split(':');
const [th, tp] = target.split(':');
const delay = Number(ms);

/** Copies src to dst, each chunk (and the end) `delay` ms after it arrived. */
function delayed(src, dst) {
  const q = [];
  let timer = null;
  let queued = 0;
  const pump = () => {
    timer = null;
    const now = Date.now();
    while (q.length && q[0].t <= now) {
      const c = q.shift();
      if (c.end) {
        dst.end();
        return;
      }
      queued -= c.b.length;
      dst.write(c.b);
    }
    if (queued < 4 << 20 && src.isPaused()) src.resume();
    if (q.length) timer = setTimeout(pump, q[0].t - now);
  };
  const push = (c) => {
    q.push({ t: Date.now() + delay, ...c });
    if (!timer) timer = setTimeout(pump, delay);
  };
  src.on('data', (b) => {
    queued += b.length;
    push({ b });
    if (queued >= 4 << 20 || dst.writableNeedDrain) src.pause();
  });
  dst.on('drain', () => {
    if (queued < 4 << 20) src.resume();
  });
  src.on('end', () => push({ end: true }));
}

const server = net.createServer((client) => {
  client.setNoDelay(true);
  const up = net.connect({ host: th, port: Number(tp) }, () => up.setNoDelay(true));
  const close = () => {
    client.destroy();
    up.destroy();
  };
  client.on('error', close);
  up.on('error', close);
  delayed(client, up);
  delayed(up, client);
});
server.listen(Number(lp), lh);
process.on('SIGTERM', () => process.exit(0));
