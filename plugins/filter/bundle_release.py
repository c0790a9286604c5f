# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""kldload.netstack.bundle_release - the release a node bundle file is (docs: bundle_release.yml)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import zipfile

from ansible.errors import AnsibleFilterError
from ansible_collections.kldload.netstack.plugins.module_utils import release as rel


def bundle_release(path):
    try:
        with zipfile.ZipFile(path) as z:
            info = json.loads(z.read("netstack_build.json").decode("utf-8"))
        sha = rel.file_sha256(path)
        rel.version_key(info.get("collection"))
    except (OSError, IOError, KeyError, ValueError, zipfile.BadZipfile, rel.ReleaseError) as e:
        raise AnsibleFilterError("bundle_release: %s is not a node bundle built by make node (%s)" % (path, e))
    return {"id": rel.release_id(info["collection"], sha), "version": info["collection"], "commit": info.get("commit"),
            "sha256": sha}


class FilterModule(object):
    def filters(self):
        return {"bundle_release": bundle_release}
