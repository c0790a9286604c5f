# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Write awx/surveys/<playbook>.json - the survey spec of each job template, in the shape AWX /
Automation Controller exports and imports - from the roles' meta/argument_specs.yml, so that the
surveys cannot drift from the roles (tests/unit/test_awx.py fails when a file is not what this writes).

A question per role option of a simple type (str, path, int, bool) whose default is a literal or
``{{ netstack_X | default(literal) }}`` - then the question sets the inventory-level ``netstack_X``,
which is what the playbooks read (install.yml runs the encryption role on ``netstack_encryption``).
Options of other types (lists, dicts) and computed defaults stay with the inventory. Every question is
optional with a blank default: AWX passes no variable for a blank optional answer, so an unanswered
question leaves the inventory's value alone (a default in the survey would override it as an extra
variable); the role's default is in the question's description.

  python3 scripts/gen_surveys.py [--check]
"""
import json
import os
import re
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "awx", "surveys")
INSTALL_ROLES = ["prereqs", "kube_proxy_removal", "encryption", "dataplane", "workloads"]
# playbook: (description, [(role, entry point)], keep(option name) -> bool)
SURVEYS = {
    "install": ("Install kldload.netstack on the nodes (playbooks/install.yml)",
                [(r, "main") for r in INSTALL_ROLES], lambda n: "_verify_" not in n),
    "verify": ("Verify kldload.netstack on the nodes (playbooks/verify.yml): the configuration as install had it, "
               "and the live checks' settings", [(r, "main") for r in INSTALL_ROLES], lambda n: True),
    "upgrade": ("Move the nodes to the collection's release, node by node, rolled back where a post-check fails "
                "(playbooks/upgrade.yml)", [("upgrade", "main")], lambda n: True),
    "rotate_keys": ("Rotate every node's WireGuard key (playbooks/rotate_keys.yml)",
                    [("encryption", "main"), ("dataplane", "main")],
                    lambda n: n.startswith(("encryption_", "dataplane_encryption", "dataplane_routing"))),
}
_INVENTORY_KNOB = re.compile(r"^\{\{\s*(netstack_[a-z0-9_]+)\s*\|\s*default\((.*)\)\s*\}\}$")


def _literal(text):
    """The value of a Jinja literal default ('x', 7680, true), or raise ValueError."""
    t = text.strip()
    if t[:1] in "'\"" and t[-1:] == t[:1]:
        return t[1:-1]
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    return int(t)


def _question(name, opt):
    typ = opt.get("type", "str")
    if typ not in ("str", "path", "int", "bool"):
        return None
    variable, default = name, opt.get("default")
    if default is None:
        return None                 # no default: set in the inventory (the bundle's path, say)
    if isinstance(default, str) and "{{" in default:
        m = _INVENTORY_KNOB.match(default.strip())
        if not m:
            return None             # computed from other variables: the inventory's business
        try:
            variable, default = m.group(1), _literal(m.group(2))
        except ValueError:
            return None
    desc = opt.get("description") or ""
    desc = " ".join(desc) if isinstance(desc, list) else desc
    desc = re.sub(r"[A-Z]\(([^)]*)\)", r"\1", desc)         # O(x), V(x), C(x), M(x) -> x
    if default is not None and default != "":
        desc += " Default: %s." % (json.dumps(default) if not isinstance(default, str) else default)
    q = {"question_name": variable, "question_description": desc.strip(), "required": False,
         "variable": variable, "default": "", "new_question": False}
    if opt.get("choices"):
        q.update(type="multiplechoice", choices=[str(c) for c in opt["choices"]])
    elif typ == "bool":
        q.update(type="multiplechoice", choices=["true", "false"])
    elif typ == "int":
        q.update(type="integer", min=0, max=2 ** 31 - 1)
    else:
        q.update(type="text", min=0, max=1024)
    return q


def survey(playbook):
    desc, entries, keep = SURVEYS[playbook]
    spec, seen = [], set()
    for role, entry in entries:
        path = os.path.join(REPO, "roles", role, "meta", "argument_specs.yml")
        with open(path) as f:
            options = yaml.safe_load(f)["argument_specs"][entry].get("options") or {}
        for name in sorted(options):
            if not keep(name):
                continue
            q = _question(name, options[name])
            if q is None or q["variable"] in seen:
                continue
            seen.add(q["variable"])
            spec.append(q)
    return {"name": "kldload.netstack %s" % playbook, "description": desc, "spec": spec}


def text(playbook):
    return json.dumps(survey(playbook), indent=2, sort_keys=True) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    os.makedirs(OUT, exist_ok=True)
    for pb in sorted(SURVEYS):
        path = os.path.join(OUT, pb + ".json")
        want = text(pb)
        have = open(path).read() if os.path.exists(path) else None
        if have != want:
            stale.append(path)
            if not check:
                with open(path, "w") as f:
                    f.write(want)
    if check and stale:
        print("stale: %s (run scripts/gen_surveys.py)" % ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
