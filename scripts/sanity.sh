#!/usr/bin/env bash
# ansible-test sanity needs each collection at .../ansible_collections/<namespace>/<name> and outside
# any other git work tree: copy the product (the repository root) and the lab collection (lab/) side
# by side there, run the whole sanity suite on the product and the tests that matter for the lab's
# modules on the lab (it imports the product's module_utils, found in the same tree).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
top=${TMPDIR:-/tmp}/netstack-sanity/ansible_collections/kldload
mkdir -p "$top/netstack" "$top/netstack_lab"
excludes=(--exclude .venv --exclude .venv-oldest --exclude .collections --exclude .ansible --exclude .git --exclude tests/output
  --exclude .pytest_cache --exclude __pycache__ --exclude '*.o' --exclude build)
rsync -a --delete --delete-excluded "${excludes[@]}" --exclude /lab ./ "$top/netstack/"
rsync -a --delete --delete-excluded "${excludes[@]}" lab/ "$top/netstack_lab/"
# Both run even when the first fails (each failure is its own report); the exit status is the
# first failure's.
rc=0
(cd "$top/netstack" && "$repo/.venv/bin/ansible-test" sanity --python 3.11 "$@") || rc=$?
if [ $# -eq 0 ]; then
  echo "=== kldload.netstack_lab (lab/)"
  (cd "$top/netstack_lab" && "$repo/.venv/bin/ansible-test" sanity --python 3.11 \
    --test validate-modules --test pep8 --test pylint --test compile --test yamllint --test ansible-doc) \
    || { r=$?; [ "$rc" -ne 0 ] || rc=$r; }
fi
exit "$rc"
