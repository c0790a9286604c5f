#!/usr/bin/env bash
# The whole test suite, in the order that fails fastest. The lab is brought up by the integration
# tests if it is not up, and taken down by molecule's destroy at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export ANSIBLE_CONFIG=$PWD/ansible.cfg PATH=$PWD/.venv/bin:$PATH
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }
step "unit tests";        pytest -q tests/unit
step "ansible-lint";      ansible-lint --profile production
step "ansible-test sanity"; bash scripts/sanity.sh
step "eBPF objects: build, verifier and manifests, the loader and the map writer on a private bpffs and cgroup"; bash bpf/selftest.sh
step "service LB benchmark, smoke run (every mode delivers connections to all 10 backends)"; bash benchmarks/service_lb/run --quick >/dev/null
step "integration tests on the lab"; pytest -q tests/integration
step "molecule (create, converge, idempotence, verify, destroy)"; molecule test -s default
step "done"
