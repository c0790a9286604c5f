#!/usr/bin/env bash
# ansible-test sanity needs the collection at .../ansible_collections/kldload/netstack and outside
# any other git work tree: copy it there and run.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dest=${TMPDIR:-/tmp}/netstack-sanity/ansible_collections/kldload/netstack
mkdir -p "$dest"
rsync -a --delete --delete-excluded --exclude .venv --exclude .collections --exclude .ansible --exclude .git --exclude tests/output \
  --exclude .pytest_cache --exclude __pycache__ --exclude '*.o' ./ "$dest/"
cd "$dest"
"$repo/.venv/bin/ansible-test" sanity --python 3.11 "$@"
