// Runs containerd's snapshotter conformance suite (snapshots/testsuite)
// against `gear snapshotter`, through containerd's own gRPC client
// (snapshots/proxy), exactly as containerd would talk to the proxy plugin.
//
// Built in GOPATH mode from Debian's golang-github-containerd-containerd-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode:$(mktemp -d) go test -v ./test/conformance
//
// Needs root and the caller's mount namespace: the suite mounts what the
// snapshotter returns. GEAR_CLI points at dist/cli/gear.js (built by tsc).
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/testutil"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
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

func TestGearSnapshotter(t *testing.T) {
	testutil.RequiresRoot(t)
	testsuite.SnapshotterSuite(t, "Gear", newGearSnapshotter(t))
}
