package conformance2

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/testutil"
	"github.com/containerd/continuity/fs/fstest"
)

// TestGearRename runs the steps of the suite's "Rename" case in the variant
// containerd 2.1 runs for snapshotters other than overlayfs (see suiteName):
// it also renames a directory of the lower layer. Renaming a directory that lives in a lower
// layer needs overlayfs redirect_dir; without it the kernel answers EXDEV to
// rename(2), for containerd's own overlay snapshotter as for ours. So: with
// redirect_dir on, the case must pass; with it off, the only accepted failure
// is EXDEV from renaming the lower directory /dir1.
func TestGearRename(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "testsuite")
	tmp := t.TempDir()
	root := filepath.Join(tmp, "root")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	sn, cleanup, err := newGearSnapshotter(t)(ctx, root)
	if err != nil {
		t.Fatalf("starting gear snapshotter: %v", err)
	}
	defer func() {
		if err := cleanup(); err != nil {
			t.Errorf("stopping gear snapshotter: %v", err)
		}
	}()

	l1 := fstest.Apply(
		fstest.CreateDir("/dir1", 0o700),
		fstest.CreateDir("/somefiles", 0o700),
		fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0o644),
		fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0o644),
	)
	l2 := fstest.Apply(
		fstest.Rename("/dir1", "/dir2"),
		fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0o644),
		fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
		fstest.Rename("/somefiles/f2", "/somefiles/f3"),
	)
	flat := filepath.Join(tmp, "flat")
	if err := os.MkdirAll(flat, 0o755); err != nil {
		t.Fatal(err)
	}
	parent := ""
	for i, a := range []fstest.Applier{l1, l2} {
		key := filepath.Join(tmp, "prepare", string(rune('a'+i)))
		name := filepath.Join(tmp, "committed", string(rune('a'+i)))
		mounts, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatalf("layer %d: prepare: %v", i+1, err)
		}
		applyErr := mount.WithTempMount(ctx, mounts, func(dir string) error { return a.Apply(dir) })
		if applyErr != nil {
			b, _ := os.ReadFile("/sys/module/overlay/parameters/redirect_dir")
			if i == 1 && strings.TrimSpace(string(b)) == "N" && errors.Is(applyErr, syscall.EXDEV) {
				t.Logf("rename of a lower directory failed with EXDEV as expected: overlayfs redirect_dir is off on this kernel (%v)", applyErr)
				return
			}
			t.Fatalf("layer %d: apply: %v", i+1, applyErr)
		}
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatalf("layer %d: commit: %v", i+1, err)
		}
		if err := a.Apply(flat); err != nil {
			t.Fatal(err)
		}
		view := name + "-view"
		vm, err := sn.View(ctx, view, name)
		if err != nil {
			t.Fatalf("layer %d: view: %v", i+1, err)
		}
		if err := mount.WithTempMount(ctx, vm, func(dir string) error { return fstest.CheckDirectoryEqual(flat, dir) }); err != nil {
			t.Fatalf("layer %d: view differs from the flat tree: %v", i+1, err)
		}
		if err := sn.Remove(ctx, view); err != nil {
			t.Fatalf("layer %d: remove view: %v", i+1, err)
		}
		parent = name
	}
}
