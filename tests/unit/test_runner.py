"""runner.Tool: one wrapper for every command-line tool, with an AnsibleModule or without one."""
import os

import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import runner
from ansible_collections.kldload.netstack.plugins.module_utils.runner import Tool, ToolError


# -- with a module: get_bin_path and run_command ---------------------------------------------------

class FakeModule:
    def __init__(self, found=("ss",), answer=(0, "out\n", "")):
        self.found = found
        self.answer = answer
        self.lookups = []
        self.calls = []

    def get_bin_path(self, binary, opt_dirs=None):
        self.lookups.append((binary, opt_dirs))
        return "/usr/sbin/" + binary if binary in self.found else None

    def run_command(self, argv, **kw):
        self.calls.append((argv, kw))
        return self.answer


def test_module_mode_finds_the_binary_in_the_sbin_directories_too():
    module = FakeModule()
    tool = Tool(module, "ss", ["-H"])
    assert tool.available and tool.path == "/usr/sbin/ss"
    assert module.lookups == [("ss", ["/usr/sbin", "/sbin", "/usr/local/sbin"])]
    assert not Tool(module, "nft").available


def test_module_mode_runs_with_the_c_locale_and_the_prefix():
    module = FakeModule()
    assert Tool(module, "ss", ["-H"]).run("-t", 4) == (0, "out\n", "")
    argv, kw = module.calls[0]
    assert argv == ["/usr/sbin/ss", "-H", "-t", "4"]
    assert kw == dict(data=None, binary_data=False, check_rc=False, environ_update={"LC_ALL": "C", "LANG": "C"})


def test_module_mode_passes_stdin_as_is_and_keeps_other_environment():
    module = FakeModule()
    Tool(module, "ss").run(data="*nat\nCOMMIT", environ_update={"XTABLES_LOCKFILE": "/run/x", "LC_ALL": "de_DE"})
    kw = module.calls[0][1]
    assert kw["data"] == "*nat\nCOMMIT" and kw["binary_data"] is True
    assert kw["environ_update"] == {"XTABLES_LOCKFILE": "/run/x", "LC_ALL": "C", "LANG": "C"}


def test_module_mode_nonzero_exit_is_a_tool_error_unless_unchecked():
    module = FakeModule(answer=(2, "partial", "ss: bad filter\n"))
    with pytest.raises(ToolError) as e:
        Tool(module, "ss").run("state", "bogus")
    assert (e.value.argv, e.value.rc, e.value.out, e.value.err) == (
        ["/usr/sbin/ss", "state", "bogus"], 2, "partial", "ss: bad filter\n")
    assert str(e.value) == "/usr/sbin/ss state bogus exited 2: ss: bad filter"
    assert Tool(module, "ss").run("x", check=False) == (2, "partial", "ss: bad filter\n")


def test_a_missing_binary_is_an_error_only_when_used():
    for module in (FakeModule(found=()), None):
        tool = Tool(module, "netstack-no-such-tool")
        assert not tool.available and tool.path is None
        assert tool.run("x", check=False) == (127, "", "netstack-no-such-tool: command not found")
        with pytest.raises(ToolError) as e:
            tool.run("x")
        assert e.value.rc == 127 and e.value.argv == ["netstack-no-such-tool", "x"]
    assert FakeModule(found=()).calls == []


# -- without a module: shutil.which and subprocess -------------------------------------------------

def test_without_a_module_the_binary_is_found_on_path_and_in_sbin(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    exe = tmp_path / "mytool"
    exe.write_text("#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    assert Tool(None, "mytool").path == str(exe)
    if os.path.isfile("/usr/sbin/nologin") or os.path.isfile("/sbin/nologin"):
        assert Tool(None, "nologin").path in ("/usr/sbin/nologin", "/sbin/nologin")
    assert Tool(None, "/bin/true").path == "/bin/true"
    assert runner.find_binary("/nonexistent/tool") is None


def test_without_a_module_true_and_false():
    assert Tool(None, "true").run() == (0, "", "")
    assert Tool(None, "/bin/true").available
    assert Tool(None, "false").run(check=False)[0] == 1
    with pytest.raises(ToolError) as e:
        Tool(None, "false").run("--ignored")
    assert e.value.rc == 1 and e.value.argv[1:] == ["--ignored"]


def test_without_a_module_the_c_locale_is_forced(monkeypatch):
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("NETSTACK_KEPT", "yes")
    sh = Tool(None, "/bin/sh", ["-c"])
    assert sh.run("echo $LC_ALL $LANG $NETSTACK_KEPT") == (0, "C C yes\n", "")
    assert os.environ["LC_ALL"] == "de_DE.UTF-8"  # the caller's environment is left alone


def test_without_a_module_output_is_text_and_stderr_separate():
    rc, out, err = Tool(None, "/bin/sh", ["-c"]).run("printf 'caf\\303\\251\\n'; echo oops >&2; exit 3", check=False)
    assert (rc, out, err) == (3, "caf\u00e9\n", "oops\n")
    assert isinstance(out, str) and isinstance(err, str)


def test_without_a_module_stdin_is_optional_and_passed_as_is():
    cat = Tool(None, "cat")
    assert cat.run(data="a\nb") == (0, "a\nb", "")
    assert cat.run(data=b"\x00raw") == (0, "\x00raw", "")
    assert cat.run() == (0, "", "")  # no data: /dev/null, never the caller's stdin


def test_without_a_module_bytes_that_are_not_utf8_survive_a_round_trip():
    out = Tool(None, "/bin/sh", ["-c"]).run("printf '\\377x'")[1]
    assert Tool(None, "cat").run(data=out)[1] == out


def test_without_a_module_cwd_timeout_and_unknown_keywords(tmp_path):
    assert Tool(None, "pwd").run(cwd=str(tmp_path))[1].strip() == str(tmp_path)
    rc, dummy, err = Tool(None, "sleep").run("5", timeout=0.2, check=False)
    assert rc == 124 and "timed out" in err
    with pytest.raises(TypeError):
        Tool(None, "true").run(environ_update={"X": "1"})


def test_without_a_module_a_file_that_cannot_run_is_126(tmp_path, monkeypatch):
    exe = tmp_path / "broken"
    exe.write_text("not a program\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    tool = Tool(None, "broken")
    assert tool.available
    rc, out, err = tool.run(check=False)
    assert rc == 126 and out == "" and "broken" in err
