"""Jobs as AWX / Automation Controller runs them: ansible-runner with a private data directory laid out
the way AWX lays it (project with the collection installed from the built tarball, inventory,
env/extravars, env/settings, env/ssh_key as the machine credential, env/envvars), against the lab:
install, install again (changed=0), verify (changed=0) with a survey answer as an extra variable, upgrade
to the release already running (changed=0) with survey answers.
The runner's status and per-host stats are asserted."""
import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import INVENTORY, REPO, VENV_BIN

ansible_runner = pytest.importorskip("ansible_runner")


@pytest.fixture(scope="module")
def private_data_dir(lab, tmp_path_factory):
    root = tmp_path_factory.mktemp("awx-job")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(["make", "-s", "node"], cwd=str(REPO), check=True, capture_output=True)
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(dist)],
                   cwd=str(REPO), check=True, capture_output=True)
    tar = sorted(dist.iterdir())[0]
    project = root / "project"
    (project / "collections").mkdir(parents=True)
    # the project AWX checks out: the collection from collections/requirements.yml (here: the tarball)
    (project / "collections" / "requirements.yml").write_text(yaml.safe_dump(
        {"collections": [{"name": str(tar), "type": "file"}]}))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(project / "collections"))
    env.pop("ANSIBLE_CONFIG", None)
    subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", "-r", "collections/requirements.yml",
                    "-p", "collections"], cwd=str(project), check=True, capture_output=True, env=env)
    for pb in ("install", "verify", "upgrade"):
        (project / (pb + ".yml")).write_text("---\n- name: kldload.netstack %s\n  ansible.builtin.import_playbook: "
                                             "kldload.netstack.%s\n" % (pb, pb))
    # the inventory without the key file: the key comes as the job's machine credential (env/ssh_key)
    inv = yaml.safe_load(INVENTORY.read_text())
    key = open(inv["all"]["vars"].pop("ansible_ssh_private_key_file")).read()
    (root / "inventory").mkdir()
    (root / "inventory" / "hosts.yml").write_text(yaml.safe_dump(inv))
    (root / "env").mkdir()
    (root / "env" / "ssh_key").write_text(key)
    os.chmod(str(root / "env" / "ssh_key"), 0o600)
    (root / "env" / "settings").write_text(json.dumps({"idle_timeout": 900, "job_timeout": 1800}))
    (root / "env" / "envvars").write_text(json.dumps({
        "ANSIBLE_COLLECTIONS_PATH": str(project / "collections"), "ANSIBLE_HOST_KEY_CHECKING": "False",
        "PATH": "%s:%s" % (VENV_BIN, os.environ.get("PATH", "/usr/bin:/bin"))}))
    yield root
    shutil.rmtree(str(root), ignore_errors=True)


def _job(pdd, playbook, extravars=None):
    (pdd / "env" / "extravars").write_text(json.dumps(extravars or {}))
    saved = os.environ.pop("ANSIBLE_CONFIG", None)      # the project's configuration, not the checkout's
    try:
        r = ansible_runner.run(private_data_dir=str(pdd), playbook=playbook, quiet=True)
    finally:
        if saved is not None:
            os.environ["ANSIBLE_CONFIG"] = saved
    out = r.stdout.read() if r.stdout else ""
    return r, out


def _task_paths(r):
    return set((e.get("event_data") or {}).get("task_path", "").split(":")[0] for e in r.events
               if e.get("event") == "runner_on_ok")


def test_install_and_verify_jobs_through_ansible_runner(lab, private_data_dir):
    nodes = lab.hosts()
    r, out = _job(private_data_dir, "install.yml")
    assert r.status == "successful" and r.rc == 0, out[-4000:]
    assert sorted(r.stats["ok"]) == sorted(nodes) and not r.stats["failures"] and not r.stats["dark"]
    # the roles ran from the collection installed into the project, not from the checkout
    installed = str(private_data_dir / "project" / "collections" / "ansible_collections" / "kldload" / "netstack")
    paths = _task_paths(r)
    assert paths and all(p.startswith(installed) for p in paths if "/kldload/netstack/" in p), sorted(paths)[:5]
    assert not [p for p in paths if p.startswith(str(REPO) + "/roles")]
    # the same job again: nothing changes on any node
    r, out = _job(private_data_dir, "install.yml")
    assert r.status == "successful", out[-4000:]
    assert not any(r.stats["changed"].values()), (r.stats["changed"], out[-4000:])
    # verify with a survey answer (an extra variable of the job), quiet
    r, out = _job(private_data_dir, "verify.yml", {"dataplane_verify_connections": 200})
    assert r.status == "successful", out[-4000:]
    assert sorted(r.stats["ok"]) == sorted(nodes) and not any(r.stats["changed"].values()), r.stats
    # upgrade to the release the install just put there, one batch: nothing to do
    r, out = _job(private_data_dir, "upgrade.yml", {"netstack_upgrade_batch": len(nodes), "upgrade_live_checks": False})
    assert r.status == "successful", out[-4000:]
    assert sorted(r.stats["ok"]) == sorted(nodes) and not any(r.stats["changed"].values()), r.stats
