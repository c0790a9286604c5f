# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.policy_documents - the policy documents of YAML files on the controller, read and parsed
there (docs: policy_documents.yml next to this file; rules: plugins/module_utils/policy/parse.py)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils.policy import parse


def policy_documents(paths):
    """Every document of the files ``paths`` (several per file, or a List), in order, validated; an error names
    each file that cannot be read, is not YAML, or holds an invalid document (by its path in the file)."""
    docs, errors = [], []
    for path in paths or []:
        try:
            with open(path) as f:
                text = f.read()
        except (IOError, OSError) as e:
            errors.append("%s: cannot read the policy file: %s" % (path, e.strerror or e))
            continue
        try:
            mine = parse.load_text(text, path)
            parse.normalize(mine, path)
            docs += mine
        except parse.PolicyError as e:
            errors += ["%s: %s" % (path, line) if not line.startswith(path) else line for line in str(e).splitlines()]
    if not errors:
        try:
            parse.normalize(docs, "policy files")      # across files: a name used twice in a namespace
        except parse.PolicyError as e:
            errors.append(str(e))
    if errors:
        raise AnsibleFilterError("\n".join(errors))
    return [dict(d) for d in docs]


class FilterModule(object):
    def filters(self):
        return {"policy_documents": policy_documents}
