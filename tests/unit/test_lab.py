import pytest

from ansible_collections.kldload.netstack_lab.plugins.module_utils import lab


class _FakeLab:
    check = False


def _node(tmp_path, name="worker1"):
    return lab.Node(_FakeLab(), {"name": name, "state_dir": str(tmp_path)})


def test_interface_names_fit_the_kernel_limit():
    assert lab._ifname("km", "worker59") == "km-worker59"
    with pytest.raises(lab.LabError, match="exceeds 15 characters"):
        lab._ifname("km", "averyveryverylongname")


def test_boot_log_tail_drops_escapes_and_spinners(tmp_path):
    node = _node(tmp_path)
    (tmp_path / "nodes" / "worker1").mkdir(parents=True)
    with open(node.bootlog, "w") as f:
        f.write("\x1b[0;1;31mFailed to start frr.service\x1b[0m\n"
                "\x1bM\n\x1b[K[   ***] Job frr.service/start running (1min 23s / 2min): restarting all\n"
                "[  OK  ] Reached target multi-user.target\n")
    tail = node.boot_log_tail()
    assert tail.splitlines() == ["Failed to start frr.service", "[  OK  ] Reached target multi-user.target"]


def test_missing_boot_log_is_reported(tmp_path):
    assert _node(tmp_path).boot_log_tail() == "(no boot log)"


def test_a_stale_pid_file_is_not_a_running_node(tmp_path):
    node = _node(tmp_path)
    (tmp_path / "nodes" / "worker1").mkdir(parents=True)
    with open(node.pidfile, "w") as f:
        f.write("1\n")  # pid 1 exists but is not our nspawn
    assert node.pid() is None
