# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A consumer of a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF) in pure Python: the map's memory mapped, as
the kernel lays it out for consumers (kernel/bpf/ringbuf.c; libbpf's ring_buffer__consume follows the same
protocol):

- offset 0 of the map fd: one page holding the consumer position (u64), the only page userspace writes;
- offset one page: the producer position's page (u64 at its start), then the data area of ``max_entries``
  bytes mapped twice in a row, so a record that wraps around the end reads as one contiguous slice.

Each record starts with an 8-byte header: u32 length with bit 31 "busy" (the producer has reserved it and not
committed it yet) and bit 30 "discard", then u32 page offset (the kernel's). Records are padded to 8 bytes. The
consumer reads from its position up to the producer position, stops at a busy record, skips discarded ones, and
publishes its new position after each record, which frees the space for the producers. Positions only grow.
The map fd is pollable: readable when data is waiting (the programs wake the consumer when it has caught up).

Aligned 8-byte loads and stores are single accesses on the architectures the nodes run; Python gives no
stronger ordering than that, which x86-64's and arm64's (the kernel pairs its stores with smp_store_release)
loads of the header after the producer position are enough for in practice: a record is only read when the
producer position has passed it and its busy bit is clear. No Ansible imports.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import mmap
import os
import select
import struct

from ansible_collections.kldload.netstack.plugins.module_utils import bpfsys

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = struct.Struct("=II")
POS = struct.Struct("=Q")


class RingBuffer:
    """``RingBuffer(path)``: the ring buffer map pinned at ``path``; ``read()`` the records waiting, ``wait()``
    for more. ``close()`` when done (or use ``with``)."""

    def __init__(self, path=None, fd=None):
        self.fd = bpfsys.obj_get(path) if fd is None else fd
        self._own = fd is None
        info = bpfsys.map_info(self.fd)
        if info["type"] != "ringbuf":
            raise ValueError("%s is a %s map, not a ring buffer" % (path or fd, info["type"]))
        self.size = info["max_entries"]
        self.mask = self.size - 1
        self.page = mmap.PAGESIZE
        self._cons = mmap.mmap(self.fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(self.fd, self.page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=self.page)
        self._poll = select.epoll()
        self._poll.register(self.fd, select.EPOLLIN)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        for m in (self._cons, self._prod):
            try:
                m.close()
            except (ValueError, OSError):
                pass
        self._poll.close()
        if self._own:
            os.close(self.fd)

    def positions(self):
        """(consumer position, producer position)."""
        return POS.unpack_from(self._cons, 0)[0], POS.unpack_from(self._prod, 0)[0]

    def pending(self):
        """Bytes written and not consumed yet."""
        cons, prod = self.positions()
        return prod - cons

    def read(self, limit=None):
        """The records waiting (bytes each), at most ``limit``; the space they took is given back."""
        out = []
        cons, prod = self.positions()
        while cons < prod and (limit is None or len(out) < limit):
            off = self.page + (cons & self.mask)
            length, _pgoff = HDR.unpack_from(self._prod, off)
            if length & BUSY:
                break                                   # reserved, not committed yet: later
            n = length & ~(BUSY | DISCARD)
            if not length & DISCARD:
                out.append(self._prod[off + HDR.size:off + HDR.size + n])
            cons += (n + HDR.size + 7) & ~7
            POS.pack_into(self._cons, 0, cons)          # free the record's space for the producers
            if cons >= prod:
                prod = POS.unpack_from(self._prod, 0)[0]
        return out

    def wait(self, timeout):
        """Block until data is waiting or ``timeout`` seconds passed; True when data is waiting."""
        if self.pending():
            return True
        try:
            self._poll.poll(timeout)
        except InterruptedError:  # pragma: no cover - Python 3.5+ retries by itself
            pass
        return self.pending() > 0
