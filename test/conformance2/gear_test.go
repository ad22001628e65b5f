// Runs containerd 2.1's snapshotter conformance suite (core/snapshots/testsuite)
// against `gear snapshotter`, through containerd 2.1's own gRPC client
// (core/snapshots/proxy), exactly as containerd 2.1 talks to a proxy plugin.
// test/conformance is the same for containerd 1.6.
//
// Built offline in GOPATH mode from Debian unstable's
// golang-github-containerd-containerd-dev 2.1 and the -dev packages of its
// dependencies, with unstable's Go (scripts/install-unstable.sh puts them all
// under /var/cache/gear-test/unstable/root):
//
//	R=/var/cache/gear-test/unstable/root
//	GOROOT=$R/usr/lib/go-1.27 GO111MODULE=off GOTOOLCHAIN=local \
//	  GOPATH=$R/usr/share/gocode:$(mktemp -d) $R/usr/lib/go-1.27/bin/go test -v ./test/conformance2
//
// Needs root and the caller's mount namespace: the suite mounts what the
// snapshotter returns. GEAR_CLI points at dist/cli/gear.js (built by tsc).
package conformance2

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/pkg/testutil"
	"google.golang.org/grpc"
)

const socketWait = 30 * time.Second

func gearCLI(t *testing.T) string {
	if p := os.Getenv("GEAR_CLI"); p != "" {
		return p
	}
	p, err := filepath.Abs("../../dist/cli/gear.js")
	if err != nil {
		t.Fatalf("cannot locate dist/cli/gear.js: %v", err)
	}
	return p
}

// process is one started `gear snapshotter`; done is closed when it exits,
// after err is set, so any number of waiters can observe the exit.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// waitForSocket polls until something accepts connections on socket, the
// process exits, or the bounded wait ends.
func waitForSocket(socket string, p *process) error {
	deadline := time.Now().Add(socketWait)
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("gear snapshotter exited before listening: %v", p.err)
		default:
		}
		if c, err := net.DialTimeout("unix", socket, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("gear snapshotter did not listen on %s within %s", socket, socketWait)
}

// newGearSnapshotter is the suite's factory: one fresh `gear snapshotter`
// process per case, on that case's own root, stopped by PID in the cleanup.
func newGearSnapshotter(t *testing.T) testsuite.SnapshotterFunc {
	cli := gearCLI(t)
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		socket := filepath.Join(root, "s.sock")
		logFile, err := os.Create(filepath.Join(filepath.Dir(root), "gear.log"))
		if err != nil {
			return nil, nil, err
		}
		cmd := exec.Command("node", cli, "snapshotter", "--root", root, "--socket", socket, "--log-level", "info")
		cmd.Stdout = logFile
		cmd.Stderr = logFile
		if err := cmd.Start(); err != nil {
			logFile.Close()
			return nil, nil, err
		}
		p := &process{cmd: cmd, done: make(chan struct{})}
		go func() {
			p.err = cmd.Wait()
			close(p.done)
		}()

		stop := func() error {
			defer logFile.Close()
			select {
			case <-p.done:
				return fmt.Errorf("gear snapshotter (pid %d) had already exited: %v", cmd.Process.Pid, p.err)
			default:
			}
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
				if p.err != nil {
					return fmt.Errorf("gear snapshotter (pid %d) exited uncleanly on SIGTERM: %v", cmd.Process.Pid, p.err)
				}
				return nil
			case <-time.After(20 * time.Second):
				_ = cmd.Process.Kill()
				select {
				case <-p.done:
				case <-time.After(10 * time.Second):
				}
				return fmt.Errorf("gear snapshotter (pid %d) ignored SIGTERM for 20s; killed", cmd.Process.Pid)
			}
		}

		if err := waitForSocket(socket, p); err != nil {
			_ = stop()
			if b, rerr := os.ReadFile(logFile.Name()); rerr == nil {
				err = fmt.Errorf("%w\n--- gear log:\n%s", err, b)
			}
			return nil, nil, err
		}
		dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		conn, err := grpc.DialContext(dialCtx, "unix://"+socket,
			grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20), grpc.MaxCallSendMsgSize(16<<20)))
		if err != nil {
			_ = stop()
			return nil, nil, fmt.Errorf("dial %s: %w", socket, err)
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "gear")
		cleanup := func() error {
			cerr := conn.Close()
			if err := stop(); err != nil {
				return err
			}
			return cerr
		}
		return sn, cleanup, nil
	}
}

// suiteName is the name containerd 2.1's suite is given. Besides naming its
// temp directories, the suite uses it in one case: "Rename" renames a
// directory of a lower layer unless the snapshotter is "overlayfs" or
// "fuse-overlayfs", because overlayfs answers that rename with EXDEV unless
// redirect_dir is on. Gear's mounts of ordinary layers are exactly the
// overlayfs snapshotter's (overlay, index=off, lowerdir/upperdir/workdir), so
// on a kernel with redirect_dir off they get the overlayfs variant; with it on
// the suite runs as "Gear" and renames the lower directory too.
// TestGearRename runs the directory rename either way and accepts EXDEV only
// where redirect_dir is off.
func suiteName() string {
	b, _ := os.ReadFile("/sys/module/overlay/parameters/redirect_dir")
	switch strings.TrimSpace(string(b)) {
	case "Y", "on", "follow":
		return "Gear"
	}
	return "overlayfs"
}

func TestGearSnapshotter(t *testing.T) {
	testutil.RequiresRoot(t)
	name := suiteName()
	t.Logf("suite name %q (overlay redirect_dir: see suiteName)", name)
	testsuite.SnapshotterSuite(t, name, newGearSnapshotter(t))
}
