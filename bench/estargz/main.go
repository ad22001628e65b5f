// gear-stargz-grpc: a containerd proxy snapshotter serving the stargz
// snapshotter library, for `make bench` (issue 11) to measure eStargz beside
// Gear. Debian ships the library (golang-github-containerd-stargz-snapshotter-dev)
// and ctr-remote (stargz-snapshotter) but not the containerd-stargz-grpc daemon,
// so this small daemon does its job. It is written here; the pieces it wires come
// from Debian's -dev packages, used the way upstream's
// cmd/containerd-stargz-grpc/main.go and service/service.go use them:
//
//   - stargzfs.NewFilesystem (github.com/containerd/stargz-snapshotter/fs): the
//     FUSE filesystem (go-fuse) that mounts an eStargz layer and fetches its
//     chunks from the registry with HTTP range requests;
//   - source.FromDefaultLabels (.../fs/source): turns the snapshot labels that
//     `ctr-remote image rpull` sets (reference, layer digest, layer list) into
//     the blob's registry source;
//   - registryHosts below: the registry hosts of a reference, a
//     docker.RegistryHost (github.com/containerd/containerd/remotes/docker) per
//     host as upstream's hostsFromConfig builds them, minus the keychains
//     (the bench registry has no auth); --insecure-registry HOST makes HOST plain
//     HTTP, as an upstream mirror entry with insecure = true does. (The library's
//     service/resolver package would do this too, but it imports the CRI API,
//     k8s.io/cri-api, which Debian 12 does not package);
//   - snbase.NewSnapshotter (.../snapshot) with AsynchronousRemove: the
//     overlayfs-based snapshotter that asks the filesystem to mount remote layers;
//   - snapshotservice.FromSnapshotter (github.com/containerd/containerd/contrib/
//     snapshotservice) registered on a grpc.Server listening on a unix socket:
//     the containerd proxy snapshotter protocol ([proxy_plugins.stargz]).
//
// Not wired (not needed by the bench): the CRI keychain and CRI source labels,
// the kubeconfig keychain, IPFS, the persistent metadata store (the library's
// in-memory one is its default), prometheus metrics.
//
// Build (GOPATH mode, Debian 12's Go 1.19 and -dev packages): bench/estargz/build.sh.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	fsconfig "github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}

func main() {
	var insecure listFlag
	address := flag.String("address", "", "unix socket of the gRPC snapshots service (required)")
	root := flag.String("root", "", "root directory of the snapshotter (required; snapshotter/ and stargz/ below it)")
	configPath := flag.String("config", "", "optional TOML file with the filesystem config (the [fs] keys of upstream's config.toml: noprefetch, no_background_fetch, blob.chunk_size, ...)")
	logLevel := flag.String("log-level", "info", "trace, debug, info, warn, error")
	pidFile := flag.String("pidfile", "", "write the daemon's pid here once it serves")
	flag.Var(&insecure, "insecure-registry", "registry host[:port] reached over plain HTTP (repeatable or comma list)")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "gear-stargz-grpc: --address and --root are required")
		os.Exit(2)
	}
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gear-stargz-grpc: --log-level %q: %v\n", *logLevel, err)
		os.Exit(2)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg fsconfig.Config
	if *configPath != "" {
		if _, err := toml.DecodeFile(*configPath, &cfg); err != nil {
			log.G(ctx).WithError(err).Fatalf("cannot read config %q", *configPath)
		}
	}

	hosts := registryHosts(insecure)

	snRoot := filepath.Join(*root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot create %q", snRoot)
	}
	// overlayfs whiteouts/opaque dirs as the kernel wants them (trusted.* as root).
	opq := layer.OverlayOpaqueTrusted
	if userxattr, err := overlayutils.NeedsUserXAttr(snRoot); err != nil {
		log.G(ctx).WithError(err).Warnf("cannot tell whether overlayfs needs userxattr; assuming %v", userxattr)
	} else if userxattr {
		opq = layer.OverlayOpaqueUser
	}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
		stargzfs.WithOverlayOpaqueType(opq))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot configure the stargz filesystem")
	}
	sn, err := snbase.NewSnapshotter(ctx, snRoot, fs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("cannot configure the snapshotter")
	}

	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot create the socket's directory")
	}
	if err := os.RemoveAll(*address); err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot remove a stale socket %q", *address)
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatalf("cannot listen on %q", *address)
	}
	served := make(chan error, 1)
	go func() { served <- rpc.Serve(l) }()
	if *pidFile != "" {
		tmp := *pidFile + ".tmp"
		if err := os.WriteFile(tmp, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644); err == nil {
			_ = os.Rename(tmp, *pidFile)
		}
	}
	log.G(ctx).WithField("address", *address).WithField("root", *root).Info("serving the stargz snapshotter")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).WithField("signal", s.String()).Info("stopping")
	case err := <-served:
		log.G(ctx).WithError(err).Error("gRPC server stopped")
	}
	rpc.Stop()
	// Close unmounts the FUSE layers and removes what AsynchronousRemove deferred.
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Error("closing the snapshotter")
	}
}

// registryHosts: one docker.RegistryHost for the reference's host, plain HTTP for
// localhost and the --insecure-registry hosts, HTTPS otherwise; anonymous auth
// (token flows of public registries still work through the authorizer).
func registryHosts(insecure []string) source.RegistryHosts {
	plain := map[string]bool{}
	for _, h := range insecure {
		plain[h] = true
	}
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		client := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone(), Timeout: 5 * time.Minute}
		h := docker.RegistryHost{
			Client:       client,
			Host:         host,
			Scheme:       "https",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client)),
		}
		if local, _ := docker.MatchLocalhost(host); local || plain[host] {
			h.Scheme = "http"
		}
		if h.Host == "docker.io" {
			h.Host = "registry-1.docker.io"
		}
		return []docker.RegistryHost{h}, nil
	}
}
