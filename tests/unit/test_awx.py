"""The collection as AWX / Automation Controller content: the tarball ansible-galaxy builds (with the
compiled node bundle, without the development checkout), installed and used from the installed copy
(FQCN playbooks, module docs); the execution environment's build context (ansible-builder create) and
the dependencies the collection declares to it; the survey specs, generated from the roles'
argument_specs; the module_defaults group."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(REPO, ".venv", "bin")
BUNDLE = os.path.join(REPO, "build", "node", "netstack.pyz")


def _version():
    with open(os.path.join(REPO, "galaxy.yml")) as f:
        return yaml.safe_load(f)["version"]


def _env(collections):
    """A controller environment that sees only ``collections`` (not the checkout's .collections)."""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_LOCAL_TEMP=os.path.join(collections, "tmp"),
               ANSIBLE_HOME=os.path.join(collections, "home"))
    env.pop("ANSIBLE_CONFIG", None)
    return env


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    """kldload-netstack-<version>.tar.gz as `make collection` builds it, and the collection installed from it."""
    if not os.path.exists(BUNDLE):
        subprocess.run(["make", "-s", "node"], cwd=REPO, check=True, capture_output=True)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([os.path.join(VENV, "ansible-galaxy"), "collection", "build", "--output-path", str(out)],
                   cwd=REPO, check=True, capture_output=True, text=True)
    tar = out / ("kldload-netstack-%s.tar.gz" % _version())
    colls = tmp_path_factory.mktemp("collections")
    p = subprocess.run([os.path.join(VENV, "ansible-galaxy"), "collection", "install", "--force", str(tar), "-p",
                        str(colls)], cwd=str(colls), check=False, capture_output=True, text=True, env=_env(str(colls)))
    assert p.returncode == 0, p.stdout + p.stderr
    return {"tar": str(tar), "collections": str(colls),
            "root": os.path.join(str(colls), "ansible_collections", "kldload", "netstack")}


def test_tarball_carries_the_node_bundle_and_leaves_the_checkout_out(tarball):
    with tarfile.open(tarball["tar"]) as t:
        names = set(t.getnames())
    for want in ("build/node/netstack.pyz", "playbooks/install.yml", "playbooks/verify.yml", "playbooks/rotate_keys.yml",
                 "meta/runtime.yml", "meta/execution-environment.yml", "roles/dataplane/tasks/main.yml",
                 "plugins/modules/node_dataplane.py"):
        assert want in names, want
    tops = set(n.split("/")[0] for n in names)
    for gone in ("tests", "lab", "benchmarks", "molecule", "scripts", ".venv", ".collections", ".git"):
        assert gone not in tops, gone
    assert not [n for n in names if n.endswith((".pyc", ".o")) or n.startswith("build/dist")]
    # the installed copy's bundle is the one built here: a controller needs no clang
    with open(os.path.join(tarball["root"], "build", "node", "netstack.pyz"), "rb") as a, open(BUNDLE, "rb") as b:
        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()


# requires_ansible (meta/runtime.yml): the pinned ansible-core (.venv) and the oldest one claimed (.venv-oldest,
# requirements-oldest.txt; scripts/setup.sh makes it)
CORES = {"newest": VENV, "oldest": os.path.join(REPO, ".venv-oldest", "bin")}


def test_the_oldest_core_is_the_one_requires_ansible_claims():
    with open(os.path.join(REPO, "meta", "runtime.yml")) as f:
        claimed = yaml.safe_load(f)["requires_ansible"]
    p = subprocess.run([os.path.join(CORES["oldest"], "ansible"), "--version"], capture_output=True, text=True, check=True)
    have = re.search(r"core (\d+\.\d+)", p.stdout).group(1)
    assert claimed == ">=%s.0" % have, (claimed, have)


@pytest.mark.parametrize("core", sorted(CORES))
@pytest.mark.parametrize("playbook", ["install", "verify", "uninstall", "rotate_keys", "upgrade", "rollback"])
def test_playbooks_run_from_the_installed_collection_by_fqcn(tarball, playbook, core):
    p = subprocess.run([os.path.join(CORES[core], "ansible-playbook"), "--syntax-check", "-i", "localhost,",
                        "kldload.netstack.%s" % playbook], cwd=tarball["collections"], capture_output=True, text=True,
                       check=False, env=_env(tarball["collections"]))
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.path.join(tarball["root"], "playbooks", playbook + ".yml") in p.stdout


@pytest.mark.parametrize("core", sorted(CORES))
def test_module_docs_from_the_installed_collection(tarball, core):
    p = subprocess.run([os.path.join(CORES[core], "ansible-doc"), "-l", "kldload.netstack"], cwd=tarball["collections"],
                       capture_output=True, text=True, check=False, env=_env(tarball["collections"]))
    assert p.returncode == 0, p.stderr
    mods = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "plugins", "modules")) if f.endswith(".py"))
    listed = sorted(re.findall(r"^kldload\.netstack\.(\w+)", p.stdout, re.M))
    assert listed == mods


def test_execution_environment_build_context(tarball, tmp_path):
    """ansible-builder create writes the context (the image build itself needs a registry: docs/awx.md);
    the collection's own dependencies reach the EE through its meta/execution-environment.yml."""
    src = os.path.join(REPO, "awx", "execution-environment.yml")
    with open(src) as f:
        ee = yaml.safe_load(f)
    assert ee["version"] == 3
    name = os.path.basename(tarball["tar"])
    assert ee["additional_build_files"][0]["src"] == name           # the EE names this release's tarball
    assert ee["dependencies"]["galaxy"]["collections"][0]["name"] == "/build/collections/" + name
    with open(os.path.join(REPO, "requirements.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line)
    assert ee["dependencies"]["ansible_core"]["package_pip"] == "ansible-core==" + pins["ansible-core"]
    assert ee["dependencies"]["ansible_runner"]["package_pip"] == "ansible-runner==" + pins["ansible-runner"]
    work = tmp_path / "ee"
    work.mkdir()
    shutil.copy(src, str(work))
    shutil.copy(tarball["tar"], str(work))
    p = subprocess.run([os.path.join(VENV, "ansible-builder"), "create", "-f", "execution-environment.yml", "-c", "context"],
                       cwd=str(work), capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    ctx = work / "context"
    files = [f for f in ("Containerfile", "Dockerfile") if (ctx / f).exists()]
    text = (ctx / files[0]).read_text()
    assert "ansible-galaxy collection install" in text and "COPY _build/collections/ /build/collections/" in text
    assert (ctx / "_build" / "collections" / name).exists()
    intro = subprocess.run([sys.executable, str(ctx / "_build" / "scripts" / "introspect.py"), "introspect",
                            tarball["collections"]], capture_output=True, text=True, check=True).stdout
    deps = yaml.safe_load(intro)
    assert [d.split()[0] for d in deps["python"]] == ["jmespath>=1.0", "netaddr>=0.10"]
    assert "openssh-client" in " ".join(deps["system"])


def test_surveys_are_generated_from_the_argument_specs():
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gen_surveys.py"), "--check"],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    for pb in ("install", "verify", "rotate_keys"):
        with open(os.path.join(REPO, "awx", "surveys", pb + ".json")) as f:
            survey = json.load(f)
        assert survey["name"] and survey["description"] and survey["spec"]
        variables = [q["variable"] for q in survey["spec"]]
        assert len(variables) == len(set(variables))
        for q in survey["spec"]:
            assert q["type"] in ("text", "integer", "multiplechoice") and q["required"] is False and q["default"] == ""
            if q["type"] == "multiplechoice":
                assert q["choices"]
    with open(os.path.join(REPO, "awx", "surveys", "install.json")) as f:
        install = dict((q["variable"], q) for q in json.load(f)["spec"])
    # the inventory-level knobs the playbooks read, not the role variables derived from them
    assert install["netstack_encryption"]["choices"] == ["none", "wireguard"]
    assert install["netstack_routing_mode"]["choices"] == ["tunnel", "native"]
    assert "dataplane_encryption" not in install and "dataplane_services" not in install


def test_module_defaults_group_members_share_their_options():
    with open(os.path.join(REPO, "meta", "runtime.yml")) as f:
        groups = yaml.safe_load(f)["action_groups"]
    for group, members in groups.items():
        for m in members:
            with open(os.path.join(REPO, "plugins", "modules", m + ".py")) as f:
                assert "pin_path" in f.read(), (group, m)
