# Gear: make demo (end to end), make test (all tests), make bench (benchmarks).
SHELL := /bin/bash
NPM_STAMP := node_modules/.package-lock.json

.PHONY: all deps build test unit demo bench clean

all: build

deps:
	@bash scripts/install-deps.sh

$(NPM_STAMP): package.json package-lock.json binding.gyp native/gear_native.cc
	npm ci --no-audit --no-fund
	@touch $(NPM_STAMP)

build: deps $(NPM_STAMP)
	npx tsc -p tsconfig.json

# Every test: unit, then integration (real dockerd, registry, containerd, overlay, FUSE).
test: build
	npx vitest run

unit: build
	npx vitest run --project unit

demo: build
	bash scripts/demo.sh

bench: build
	bash bench/run.sh

clean:
	rm -rf dist build
