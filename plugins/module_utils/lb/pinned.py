# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""lb's pinned maps in the node's globals directory, opened once and checked against their layout."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import fcntl
import os

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys
from ansible_collections.kldload.netstack.plugins.module_utils.lb.layout import MAPS, S, pin
from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import LbError


class Maps:
    """The maps of ``MAPS`` pinned in ``map_dir`` (``<pin root>/globals``) under their pin names; every
    one's type and key and value sizes checked. Reads: ``dump`` (whole map, two buffers), ``lookup``;
    writes: ``update``, ``delete`` (batched); ``lock`` serializes writers; ``close`` closes the fds."""

    def __init__(self, map_dir, names=None):
        self.mapdir = map_dir
        self.fd = {}
        self.info = {}
        self.lock_fd = None
        try:
            for name in names or MAPS:
                path = os.path.join(map_dir, pin(name))
                if not os.path.exists(path):
                    raise LbError("map %s is not pinned in %s (as %s): load the socket LB object first (the dataplane "
                                  "role, or kldload.netstack.bpf_program)" % (name, map_dir, pin(name)))
                self.fd[name] = bpfsys.obj_get(path)
                info = bpfsys.map_info(self.fd[name])
                typ, k, v, _n, _f = MAPS[name]
                if (info["type"], info["key_size"], info["value_size"]) != (typ, S[k].size, S[v].size):
                    raise LbError("map %s is %s key %d value %d, not the layout of this collection's socket LB "
                                  "(%s key %d value %d): the loaded object and this module do not match"
                                  % (path, info["type"], info["key_size"], info["value_size"], typ, S[k].size, S[v].size))
                self.info[name] = info
        except Exception:
            self.close()
            raise

    def close(self):
        for fd in self.fd.values():
            os.close(fd)
        self.fd = {}
        if self.lock_fd is not None:
            os.close(self.lock_fd)      # releases the flock
            self.lock_fd = None

    def _sizes(self, name):
        return self.info[name]["key_size"], self.info[name]["value_size"]

    def dump(self, name):
        """(keys, values): every entry's key back to back, and its value likewise."""
        ks, vs = self._sizes(name)
        keys, values, _n = bpfsys.map_dump_raw(self.fd[name], ks, vs, self.info[name]["max_entries"])
        return keys, values

    def lookup(self, name, key):
        """The value of one key, or None."""
        return bpfsys.map_lookup(self.fd[name], key, self.info[name]["value_size"])

    def update(self, name, keys, values):
        """Write entries given as two buffers (keys back to back, values likewise); returns the bpf() calls made."""
        if not keys:
            return 0
        ks, vs = self._sizes(name)
        return bpfsys.map_update_batch_raw(self.fd[name], keys, values, ks, vs)

    def delete(self, name, keys):
        """Delete the keys of a buffer (back to back); returns the bpf() calls made."""
        if not keys:
            return 0
        ks = self.info[name]["key_size"]
        return bpfsys.map_delete_batch(self.fd[name], [keys[i:i + ks] for i in range(0, len(keys), ks)], ks)

    def lock(self):
        """Serialize the writers of this directory: an exclusive flock() on it until close()."""
        self.lock_fd = os.open(self.mapdir, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
