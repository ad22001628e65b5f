# Gear: make demo (end to end), make test (all tests), make bench (benchmarks),
# make build && sudo make install (a self-contained gear + systemd units under PREFIX).
SHELL := /bin/bash
NPM_STAMP := node_modules/.package-lock.json

.PHONY: all deps unstable-deps build test unit fuzz test-hostile demo bench clean

all: build

deps:
	@bash scripts/install-deps.sh

$(NPM_STAMP): package.json package-lock.json binding.gyp native/gear_native.cc
	npm ci --no-audit --no-fund
	@touch $(NPM_STAMP)

# Docker 28, containerd 2.1, their Go sources, Go and the CRI api.proto from Debian unstable, into a
# cache folder (scripts/install-unstable.sh; root); the system's docker.io and containerd stay Debian 12's.
# Only the tests and the demo need them, so `make build` works as a user.
unstable-deps:
	@bash scripts/install-unstable.sh >/dev/null

build: deps $(NPM_STAMP)
	npx tsc -p tsconfig.json

# Every test: unit, hostile-input corpora and the decoder fuzz target, then integration (real
# dockerd, registry, containerd, overlay, FUSE).
test: build unstable-deps
	npx tsc -p tsconfig.test.json
	npx vitest run

unit: build
	npx vitest run --project unit

# The decoder fuzz target alone (fast-check, fixed seed, >= 50,000 cases per decoder; `make test`
# runs it too). GEAR_FUZZ_SEED=<n> replays or varies it, GEAR_FUZZ_SCALE=<x> scales every run count.
fuzz: build
	npx vitest run --project fuzz

# Hostile inputs: the deterministic corpora (test/hostile) and the fuzz target.
test-hostile: build
	npx vitest run --project hostile --project fuzz

demo: build unstable-deps
	bash scripts/demo.sh

# make bench BENCH=cold: one section (lifecycle, read, cold = cold-deploy, reread, series; comma list) instead of all.
bench: build
	$(if $(BENCH),GEAR_BENCH_SECTIONS=$(BENCH) )bash bench/run.sh

clean:
	rm -rf dist build

# Managed Docker plugin (docs/plugin.md): builds plugin/.bundle from this host's node,
# util-linux mount and busybox, then `docker plugin create` on DOCKER_HOST.
DOCKER ?= docker
DOCKER_HOST ?= unix:///var/run/docker.sock
PLUGIN_NAME ?= gear:$(shell node -p "require('./package.json').version")
.PHONY: plugin plugin-push
plugin: build
	DOCKER="$(DOCKER)" DOCKER_HOST="$(DOCKER_HOST)" bash plugin/build.sh --name "$(PLUGIN_NAME)"

# make plugin-push REF=registry.example.com/gear:0.1.0
plugin-push: build
	@test -n "$(REF)" || { echo "usage: make plugin-push REF=<registry>/<repository>:<tag>" >&2; exit 2; }
	DOCKER="$(DOCKER)" DOCKER_HOST="$(DOCKER_HOST)" bash plugin/build.sh --name "$(REF)"
	"$(DOCKER)" -H "$(DOCKER_HOST)" plugin push "$(REF)"

# Install on a host (README.md, "Install on a host"): `make build` first (as your user), then
# `sudo make install`. Copies dist/, the native addon and production node_modules to
# $(PREFIX)/lib/gear, the launcher to $(PREFIX)/bin/gear (runs $(NODE), Node.js >= 20.18.1), the
# systemd units gear-snapshotter.service and gear-daemon.service to $(SYSTEMD_UNIT_DIR), and
# $(SYSCONFDIR)/default/gear + $(SYSCONFDIR)/containerd/conf.d/gear.toml (never overwritten).
# DESTDIR stages for packagers. Builds nothing; see scripts/install.sh.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
SYSCONFDIR ?= $(if $(filter /usr /usr/local,$(PREFIX)),/etc,$(PREFIX)/etc)
SYSTEMD_UNIT_DIR ?= $(PREFIX)/lib/systemd/system
NODE ?=
INSTALL_VARS = PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" BINDIR="$(BINDIR)" LIBDIR="$(LIBDIR)" \
  SYSCONFDIR="$(SYSCONFDIR)" SYSTEMD_UNIT_DIR="$(SYSTEMD_UNIT_DIR)" NODE="$(NODE)"
.PHONY: install uninstall
install:
	$(INSTALL_VARS) bash scripts/install.sh

uninstall:
	$(INSTALL_VARS) bash scripts/install.sh --uninstall
