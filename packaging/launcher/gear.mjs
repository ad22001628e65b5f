// Entry point of an installed gear (PREFIX/bin/gear runs it): refuses a Node.js older than the one
// Gear is built for with an error that says so, then runs the CLI from dist/.
const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 20 || (major === 20 && minor < 18)) {
  process.stderr.write(
    `gear: Node.js ${process.versions.node} at ${process.execPath} is too old; Gear needs Node.js >= 20.18.1 (set GEAR_NODE=/path/to/node)\n`,
  );
  process.exit(1);
}
await import('./dist/cli/gear.js');
