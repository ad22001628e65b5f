'use strict';
// ExecStartPost= of Gear's systemd units (gear does not speak sd_notify):
//   wait-socket.cjs SOCKET [MAINPID] [BOUND_SECONDS]
// Exits 0 once SOCKET accepts a connection. A stale socket file left by a crash refuses connections,
// so it does not count. Exits 1 when MAINPID exits first or after BOUND_SECONDS (default 280).
const net = require('node:net');

const [socket, pidArg, boundArg] = process.argv.slice(2);
if (!socket) {
  process.stderr.write('usage: wait-socket.cjs SOCKET [MAINPID] [BOUND_SECONDS]\n');
  process.exit(2);
}
const pid = Number(pidArg);
const boundMs = (Number(boundArg) > 0 ? Number(boundArg) : 280) * 1000;
const start = Date.now();

function alive(p) {
  try {
    process.kill(p, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

function accepts() {
  return new Promise((resolve) => {
    const c = net.connect(socket);
    const done = (v) => {
      c.destroy();
      resolve(v);
    };
    c.setTimeout(1000, () => done(false));
    c.once('connect', () => done(true));
    c.once('error', () => done(false));
  });
}

(async () => {
  for (;;) {
    if (await accepts()) process.exit(0);
    if (Number.isSafeInteger(pid) && pid > 0 && !alive(pid)) {
      process.stderr.write(`gear exited (pid ${pid}) before it listened on ${socket}; see its log (journalctl -u gear-snapshotter or -u gear-daemon)\n`);
      process.exit(1);
    }
    if (Date.now() - start > boundMs) {
      process.stderr.write(`${socket} did not accept connections within ${boundMs / 1000}s\n`);
      process.exit(1);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
})();
