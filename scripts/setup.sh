#!/usr/bin/env bash
# Installs everything the controller (this machine) needs: Debian packages for the lab and the
# tests, a Python venv at .venv with the pinned controller requirements, and .venv-oldest with the
# oldest ansible-core the collection claims.
# Idempotent; run as root on Debian 12/13.
set -euo pipefail
cd "$(dirname "$0")/.."

HOST_PACKAGES=(
  debootstrap systemd-container iproute2 iptables nftables openssh-client
  python3 python3-venv bpftool clang llvm libbpf-dev make rsync git containernetworking-plugins
  wireguard-tools wireguard-go tcpdump frr frr-pythontools
  prometheus chromium chromium-driver
)

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/ansible-playbook ] || ! cmp -s requirements.txt .venv/.requirements.txt \
    || ! cmp -s constraints.txt .venv/.constraints.txt; then
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt -c constraints.txt
  cp requirements.txt .venv/.requirements.txt
  cp constraints.txt .venv/.constraints.txt
fi

# The oldest ansible-core the collection claims (requires_ansible), for the tests that run the playbooks with it.
if [ ! -x .venv-oldest/bin/ansible-playbook ] || ! cmp -s requirements-oldest.txt .venv-oldest/.requirements.txt; then
  /usr/bin/python3 -m venv .venv-oldest
  .venv-oldest/bin/pip install -q -r requirements-oldest.txt
  cp requirements-oldest.txt .venv-oldest/.requirements.txt
fi

# The repository root is the collection: expose it as kldload.netstack to Ansible.
mkdir -p .collections/ansible_collections/kldload
ln -sfn ../../.. .collections/ansible_collections/kldload/netstack
# The one-machine lab is a collection of its own (lab/), not part of the product.
ln -sfn ../../../lab .collections/ansible_collections/kldload/netstack_lab
# ansible-test bootstraps pip in its sanity venvs with a script it downloads from a host that is
# not reachable here; give it the offline equivalent (pip version of the pinned ansible-core).
mkdir -p ~/.ansible/test/cache
cp scripts/get_pip_offline.py ~/.ansible/test/cache/get_pip_24_2.py
# The node bundle the dataplane role copies to the nodes (nodes need no compiler): build/node/.
make -s node
echo "setup: ok"
