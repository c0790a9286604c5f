# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One wrapper per command-line tool, in the spirit of community.general's CmdRunner.

A ``Tool`` is built once per binary with the argv prefix it always takes; callers pass only the
arguments that vary. A missing binary is not an error until the tool is used, so modules can probe
for optional backends with ``Tool.available``.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ToolError(Exception):
    """A tool exited non-zero (or is missing) where success was required."""

    def __init__(self, argv, rc, out, err):
        self.argv = argv
        self.rc = rc
        self.out = out
        self.err = err
        super(ToolError, self).__init__(
            "%s exited %s: %s" % (" ".join(argv), rc, (err or out or "").strip()))


class Tool:
    """A command-line tool found on the node's PATH (plus the sbin directories)."""

    def __init__(self, module, binary, prefix=()):
        self.module = module
        self.binary = binary
        self.prefix = list(prefix)
        self.path = module.get_bin_path(binary, opt_dirs=["/usr/sbin", "/sbin", "/usr/local/sbin"])

    @property
    def available(self):
        return self.path is not None

    def run(self, *args, **kwargs):
        """Run the tool; return (rc, stdout, stderr).

        Keyword arguments: ``data`` (stdin text), ``check`` (raise ToolError on non-zero exit,
        default True).
        """
        data = kwargs.pop("data", None)
        check = kwargs.pop("check", True)
        argv = [self.path or self.binary] + self.prefix + [str(a) for a in args]
        if self.path is None:
            if check:
                raise ToolError(argv, 127, "", "%s: command not found" % self.binary)
            return 127, "", "%s: command not found" % self.binary
        rc, out, err = self.module.run_command(argv, data=data, binary_data=data is not None,
                                               check_rc=False, **kwargs)
        if check and rc != 0:
            raise ToolError(argv, rc, out, err)
        return rc, out, err
