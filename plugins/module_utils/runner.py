# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One wrapper per command-line tool, in the spirit of community.general's CmdRunner.

A ``Tool`` is built once per binary with the argv prefix it always takes; callers pass only the
arguments that vary. A missing binary is not an error until the tool is used, so callers can probe
for optional backends with ``Tool.available``.

With an AnsibleModule the tool is found with ``get_bin_path`` and run with ``run_command``; with
``module=None`` (the node command, the eBPF loader: no Ansible there) it is found with
``shutil.which`` and run with ``subprocess``. Either way every run gets the C locale (``LC_ALL=C``,
``LANG=C``), so output that is parsed never depends on the node's language settings, and either
way the result is ``(rc, stdout, stderr)`` as text.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import errno
import os
import shutil
import subprocess

SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Forced for every run: parsed output (bpftool, ss, iptables-save, nft, ...) is the C locale's.
C_LOCALE = {"LC_ALL": "C", "LANG": "C"}


class ToolError(Exception):
    """A tool exited non-zero (or is missing) where success was required."""

    def __init__(self, argv, rc, out, err):
        self.argv = argv
        self.rc = rc
        self.out = out
        self.err = err
        super(ToolError, self).__init__(
            "%s exited %s: %s" % (" ".join(argv), rc, (err or out or "").strip()))


def find_binary(binary):
    """Path of ``binary`` on PATH plus the sbin directories (or the absolute path itself), or None."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs += [d for d in SBIN_DIRS if d not in dirs]
    return shutil.which(binary, path=os.pathsep.join(dirs))


def _text(data):
    return data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data


def _run_subprocess(argv, data=None, cwd=None, timeout=None):
    """(rc, out, err) of ``argv`` run directly (no shell), stdin ``data`` or /dev/null, C locale."""
    env = dict(os.environ)
    env.update(C_LOCALE)
    if data is not None and not isinstance(data, bytes):
        data = data.encode("utf-8", "surrogateescape")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                                close_fds=True)
    except OSError as e:
        return (127 if e.errno == errno.ENOENT else 126), "", "%s: %s" % (argv[0], e.strerror or e)
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return 124, _text(out), _text(err) + "%s: timed out after %ss" % (argv[0], timeout)
    return proc.returncode, _text(out), _text(err)


class Tool:
    """A command-line tool found on the node's PATH (plus the sbin directories).

    ``module`` is an AnsibleModule, or None to run without Ansible (subprocess).
    """

    def __init__(self, module, binary, prefix=()):
        self.module = module
        self.binary = binary
        self.prefix = list(prefix)
        if module is None:
            self.path = find_binary(binary)
        else:
            self.path = module.get_bin_path(binary, opt_dirs=list(SBIN_DIRS))

    @property
    def available(self):
        return self.path is not None

    def run(self, *args, **kwargs):
        """Run the tool; return (rc, stdout, stderr).

        Keyword arguments: ``data`` (stdin text, passed as is), ``check`` (raise ToolError on
        non-zero exit, default True). With a module, other keywords go to ``run_command``; without
        one, ``cwd`` and ``timeout`` (seconds; rc 124 when it expires) are understood.
        """
        data = kwargs.pop("data", None)
        check = kwargs.pop("check", True)
        argv = [self.path or self.binary] + self.prefix + [str(a) for a in args]
        if self.path is None:
            rc, out, err = 127, "", "%s: command not found" % self.binary
        elif self.module is None:
            unknown = sorted(set(kwargs) - set(["cwd", "timeout"]))
            if unknown:
                raise TypeError("Tool.run() without a module: unexpected keyword %s" % ", ".join(unknown))
            rc, out, err = _run_subprocess(argv, data=data, **kwargs)
        else:
            environ = dict(kwargs.pop("environ_update", None) or {})
            environ.update(C_LOCALE)
            rc, out, err = self.module.run_command(argv, data=data, binary_data=data is not None,
                                                   check_rc=False, environ_update=environ, **kwargs)
        if check and rc != 0:
            raise ToolError(argv, rc, out, err)
        return rc, out, err
