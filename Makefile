# kldload.netstack — the README's two commands are `make lab` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
PLAYBOOK := $(VENV)/ansible-playbook
LAB_INVENTORY := /var/lib/kldload-netstack/lab/inventory.yml
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup node collection lab lab-up lab-down install verify uninstall test test-all unit lint sanity integration molecule clean

setup:
	bash scripts/setup.sh

## The node bundle the dataplane role installs: the eBPF objects with their manifests, and the node
## command with its library as one zipapp (build/node/).
node:
	$(MAKE) -s -C bpf
	python3 scripts/build_node.py

## The collection as AWX / Automation Controller installs it (docs/awx.md):
## build/dist/kldload-netstack-<version>.tar.gz, carrying the node bundle built just before.
collection: node
	rm -rf build/dist
	$(VENV)/ansible-galaxy collection build --output-path build/dist

## The embedded default: lab up, then the install and verify playbooks on it.
lab: setup lab-up install verify

lab-up:
	$(PLAYBOOK) -i localhost, lab/playbooks/lab.yml -e lab_state=up

lab-down:
	$(PLAYBOOK) -i localhost, lab/playbooks/lab.yml -e lab_state=down

install verify uninstall:
	$(PLAYBOOK) -i $(LAB_INVENTORY) playbooks/$@.yml

## The whole test suite: unit, lint, sanity, integration on the lab, molecule (ends with the lab down).
test: setup
	bash scripts/test.sh

## The default tier plus the integration tests marked extended (README: Tests).
test-all: setup
	NETSTACK_TESTS=all bash scripts/test.sh

unit:
	$(VENV)/pytest -q tests/unit

lint:
	$(VENV)/ansible-lint --profile production

sanity:
	bash scripts/sanity.sh

integration:
	$(VENV)/pytest -q tests/integration

molecule:
	$(VENV)/molecule test -s default
