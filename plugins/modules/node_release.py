#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: node_release
short_description: Which release of the node bundle a node runs, the previous one kept for rollback
version_added: 0.3.0
description:
  - A release is one build of the node bundle (C(make node)) - the eBPF objects, the node command, the CNI plugin
    - kept on the node in O(root)C(/releases/<id>/) with C(id) = C(<collection version>-<12 hex digits of its
    sha256>) (the P(kldload.netstack.bundle_release#filter) filter computes it on the controller).
    C(releases/current) and C(releases/previous) are symlinks; O(root)C(/netstack.pyz) points through
    C(releases/current), so the node command, the boot-time restore unit and the CNI plugin change release
    together, in one rename.
  - O(state=current) makes the staged release O(release) the running one (copy its bundle to
    C(releases/<id>/netstack.pyz) first). The release it replaces becomes the previous one, with a snapshot of
    the files in O(snapshot) (the node configuration and the service table it ran with). A release whose
    version is older than the running one is refused unless O(allow_downgrade=true). A bundle file installed
    before this layout existed is adopted as a release of its own. This does not load anything - the
    M(kldload.netstack.node_dataplane) call after it does (the dataplane role and C(playbooks/upgrade.yml)).
  - O(state=rolled_back) makes the previous release the running one again and puts its snapshot back (then
    C(netstack dataplane restore), the previous release's own node command, loads it). With no previous release
    on the node it fails and changes nothing. Afterwards there is no previous release.
  - O(state=pruned) removes the releases that are neither current nor previous.
options:
  root:
    description: Where the node bundle and its releases live.
    type: path
    default: /usr/lib/kldload-netstack
  state:
    description: See above.
    type: str
    choices: [current, rolled_back, pruned]
    default: current
  release:
    description: With O(state=current), the release to run (the output of the P(kldload.netstack.bundle_release#filter) filter).
    type: dict
    suboptions:
      id:
        description: C(<version>-<sha256 prefix>).
        type: str
        required: true
      version:
        description: The collection version the bundle was built from.
        type: str
        required: true
      sha256:
        description: The bundle's sha256 (the staged file must have it).
        type: str
        required: true
      commit:
        description: The git commit it was built from (informational).
        type: str
  snapshot:
    description: Files saved with the release that stops running (O(state=current)) and put back by O(state=rolled_back).
    type: list
    elements: path
    default: []
  allow_downgrade:
    description: Allow O(release) to be older (by version) than the running release.
    type: bool
    default: false
notes:
  - Supports check mode and diff mode (current and previous release before and after).
author:
  - kldload.netstack developers (@kldload)
"""

EXAMPLES = r"""
- name: Run the staged release
  kldload.netstack.node_release:
    release: "{{ 'build/node/netstack.pyz' | kldload.netstack.bundle_release }}"
    snapshot: [/etc/kldload-netstack/dataplane.json]

- name: Back to the release the node ran before
  kldload.netstack.node_release:
    state: rolled_back
"""

RETURN = r"""
before:
  description: The releases before.
  returned: always
  type: dict
  sample: {current: 0.3.0-4be1c0ffee12, previous: null, releases: [0.3.0-4be1c0ffee12]}
after:
  description: The releases after (in check mode, what they would be).
  returned: always
  type: dict
current:
  description: The running release after the call (id, version, commit, sha256), null when none.
  returned: always
  type: dict
previous:
  description: The previous release after the call, null when none.
  returned: always
  type: dict
restored:
  description: With O(state=rolled_back), the snapshot files put back.
  returned: when state is rolled_back
  type: list
  elements: str
removed:
  description: With O(state=pruned), the releases removed.
  returned: when state is pruned
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kldload.netstack.plugins.module_utils import release as rel


def _text(view):
    return "current: %s\nprevious: %s\nreleases: %s\n" % (view["current"], view["previous"], ", ".join(view["releases"]))


def main():
    module = AnsibleModule(argument_spec=dict(
        root=dict(type="path", default=rel.ROOT),
        state=dict(type="str", choices=["current", "rolled_back", "pruned"], default="current"),
        release=dict(type="dict", options=dict(id=dict(type="str", required=True), version=dict(type="str", required=True),
                                               sha256=dict(type="str", required=True), commit=dict(type="str"))),
        snapshot=dict(type="list", elements="path", default=[]),
        allow_downgrade=dict(type="bool", default=False),
    ), required_if=[("state", "current", ["release"])], supports_check_mode=True)
    p = module.params
    try:
        if p["state"] == "current":
            res = rel.switch(p["root"], p["release"], p["snapshot"], p["allow_downgrade"], check=module.check_mode)
        elif p["state"] == "rolled_back":
            res = rel.rollback(p["root"], check=module.check_mode)
        else:
            res = rel.prune(p["root"], check=module.check_mode)
        st = rel.state(p["root"])
    except (rel.ReleaseError, OSError, IOError) as e:
        module.fail_json(msg="%s: %s" % (p["state"], e))
    out = dict(res, current=st["current"], previous=st["previous"])
    if module._diff:
        out["diff"] = {"before": _text(res["before"]), "after": _text(res["after"])}
    module.exit_json(**out)


if __name__ == "__main__":
    main()
