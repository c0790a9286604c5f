# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The state file - ``{"generation": N, "services": [...]}``, one service per line - and its journal
(``<state file>.journal``: one JSON line per incremental change, tagged with the generation).

The full sync rewrites the state file (a new generation) and removes the journal; the incremental
path appends to the journal, and rewrites the state file once the journal is larger than it.
Readers apply the journal lines of the current generation in order and stop at a torn last line.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import json
import os
import re

from ansible_collections.kldload.netstack.plugins.module_utils.lb.spec import Service, svc_key

_GEN = re.compile(r'^\{"generation": (\d+),')
try:
    from json.encoder import encode_basestring_ascii as _encode_str
except ImportError:      # pragma: no cover
    _encode_str = json.dumps


def _generation(path):
    try:
        with open(path) as f:
            m = _GEN.match(f.readline())
    except (OSError, ValueError):
        return 0
    return int(m.group(1)) if m else 0


def load_state(state_file):
    """The declared services of the state file, with its journal applied: [service dict]."""
    return list(load(state_file).values())


def load(state_file):
    """{key: service dict} of the state file with its journal applied ({} when there is none)."""
    try:
        with open(state_file) as f:
            doc = json.load(f)
        out = dict((svc_key(s), s) for s in doc.get("services", []))
        gen = doc.get("generation", 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    try:
        with open(state_file + ".journal") as f:
            for line in f:
                try:
                    op = json.loads(line)
                except ValueError:
                    break               # a line cut short by a crash: the end of the journal
                if op.get("generation") != gen:
                    continue            # written before the state file was last rewritten
                if "upsert" in op:
                    out[svc_key(op["upsert"])] = op["upsert"]
                elif "remove" in op:
                    out.pop(tuple(op["remove"]), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return out


def names(declared):
    """{key: "namespace/name"} of load()'s services."""
    return dict((k, "%s/%s" % (s.get("namespace", "default"), s.get("name", "?"))) for k, s in declared.items())


def _text(v):
    return _encode_str(v) if isinstance(v, str) else json.dumps(v)


def encode(services):
    """The services (spec.Service or service dicts) as the state file's lines: what ``json.dumps(service,
    sort_keys=True)`` gives for each, a Service's backends encoded once however many services list them."""
    seen = {}
    words = {}
    lines = []

    def word(v):
        hit = words.get(v)
        if hit is None:
            hit = words[v] = _text(v)
        return hit

    for s in services:
        if not isinstance(s, Service):
            lines.append(json.dumps(s, sort_keys=True))
            continue
        parts = []
        for b in s.backends:
            text = seen.get(id(b))
            if text is None:
                text = seen[id(b)] = '{"ip": %s, "port": %d, "weight": %d}' % (_text(b.ip), b.port, b.weight)
            parts.append(text)
        ext = ' "external": %s,' % word(s.external) if s.external else ""
        fields = (s.affinity_timeout, word(s.algorithm), ", ".join(parts), ext, _text(s.name), word(s.namespace), s.key[1],
                  word(s.key[2]), _text(s.key[0]))
        lines.append('{"affinity_timeout": %d, "algorithm": %s, "backends": [%s],%s "name": %s, "namespace": %s, '
                     '"port": %d, "protocol": %s, "vip": %s}' % fields)
    return lines


def journal(path, upserts, removes):
    """Append the incremental changes (``upserts``: services, ``removes``: keys) to ``<path>.journal``;
    rewrite the state file (compaction) once the journal is larger than it."""
    if not os.path.exists(path):
        write_state(path, load_state(path) + list(upserts))
        return
    gen = _generation(path)
    lines = ['{"generation": %d, "upsert": %s}' % (gen, line) for line in encode(upserts)]
    lines += [json.dumps({"generation": gen, "remove": list(k)}) for k in removes]
    jpath = path + ".journal"
    fd = os.open(jpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > max(os.path.getsize(path), 65536):
        write_state(path, load_state(path))


def write_state(path, services, only_if_changed=False):
    """The declared services, one per line, with a generation number one above the last; the journal,
    now folded in, is removed after. ``only_if_changed``: leave a file that already says the same."""
    body = ",\n".join(encode(services))
    jpath = path + ".journal"
    gen = 0
    try:
        with open(path) as f:
            first = f.readline()
            rest = f.read()
        m = _GEN.match(first)
        gen = int(m.group(1)) if m else 0
        if only_if_changed and m and rest == "%s\n]}\n" % body and not os.path.exists(jpath):
            return
    except (OSError, ValueError):
        pass
    _replace(path, '{"generation": %d, "services": [\n%s\n]}\n' % (gen + 1, body))
    if os.path.exists(jpath):
        os.unlink(jpath)


def _replace(path, text):
    """Write ``path`` whole (mode 0644) through a temporary file renamed over it."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data):]
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    os.rename(tmp, path)
