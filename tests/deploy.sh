#!/bin/sh
# deploy.sh - validate deploy/ offline: the Kubernetes manifests against the
# Kubernetes API schemas (npm package kubernetes-models) and dotp's rules
# (Pod Security restricted, `dotp healthcheck` probes, scrape annotations),
# docker-compose.yml's keys, and the Grafana dashboard's queries against
# README.md's metrics; then a self-test that broken copies are rejected.
# With ./dotp built, also the dashboard's metrics against its /metrics and
# the manifests' probe commands against it, on loopback.
#
# The node packages come from tests/deploy-check/package-lock.json, installed
# by `npm ci` into build/deploy-check/ (again only when the lockfile
# changed, or with DEPLOY_NPM_CI=1). Needs node and npm: nodejs is in the
# Makefile's TEST_PKGS; npm is installed here when missing (Debian's npm
# package; a node that brings its own npm, as NodeSource's, conflicts with
# it, so it cannot be a TEST_PKGS entry).
set -eu
cd "$(dirname "$0")/.."

node=$(command -v node || command -v nodejs || true)
if [ -z "$node" ]; then
	echo "deploy: no node on PATH: sh bearssl/deps.sh nodejs npm" >&2
	exit 1
fi
if ! command -v npm >/dev/null 2>&1; then
	sh bearssl/deps.sh npm
fi

dir=build/deploy-check
src=tests/deploy-check
mkdir -p "$dir"
if [ "${DEPLOY_NPM_CI:-0}" = 1 ] || [ ! -d "$dir/node_modules" ] ||
    ! cmp -s "$src/package-lock.json" "$dir/package-lock.json"; then
	cp "$src/package.json" "$src/package-lock.json" "$dir/"
	echo "deploy: npm ci in $dir ($("$node" --version), npm $(npm --version))"
	(cd "$dir" && npm ci --no-audit --no-fund --prefer-offline \
		--loglevel=error) || {
		rm -f "$dir/package-lock.json"
		echo "deploy: npm ci failed" >&2
		exit 1
	}
fi

DEPLOY_CHECK_MODULES=$PWD/$dir/node_modules \
	exec "$node" "$src/check.js" --self-test --dotp ./dotp
