"""Kubernetes label syntax and selectors (plugins/module_utils/labels.py)."""
import pytest

from ansible_collections.kldload.netstack.plugins.module_utils import labels as L


@pytest.mark.parametrize("key", ["app", "a", "app.kubernetes.io/name", "example.com/x_y.z-1", "A9", "k" * 63,
                                 ("p" * 253) + "/n", "x.y/" + "n" * 63])
def test_valid_keys(key):
    assert L.key_error(key) is None


@pytest.mark.parametrize("key,why", [
    ("", "empty"), ("-app", "name part"), ("app-", "name part"), ("a b", "name part"), ("k" * 64, "name part"),
    ("/app", "prefix before"), ("Example.com/app", "prefix"), ("ex_ample.com/app", "prefix"),
    (("p" * 254) + "/n", "prefix"), ("example.com/", "name part must not be empty"), ("a/b/c", "prefix"),
    (5, "string"),
])
def test_invalid_keys(key, why):
    assert why in L.key_error(key)


@pytest.mark.parametrize("value", ["", "v", "v1.2_3-x", "V" * 63])
def test_valid_values(value):
    assert L.value_error(value) is None


@pytest.mark.parametrize("value", ["-v", "v-", "a b", "v" * 64, 1, None, True])
def test_invalid_values(value):
    assert L.value_error(value) is not None


def test_validate_labels_names_the_field():
    assert L.validate_labels(None, "x") == {}
    assert L.validate_labels({"app": "web"}, "x") == {"app": "web"}
    with pytest.raises(ValueError, match=r"^wl\[0\]\.labels: label key 'bad key' is invalid: the name part"):
        L.validate_labels({"bad key": "v"}, "wl[0].labels")
    with pytest.raises(ValueError, match=r"^wl\.labels\.tier: label value '-x' is invalid: a label value must be"):
        L.validate_labels({"tier": "-x"}, "wl.labels")
    with pytest.raises(ValueError, match=r"quote it in YAML"):
        L.validate_labels({"version": 2}, "wl.labels")
    with pytest.raises(ValueError, match="must be a mapping"):
        L.validate_labels(["a"], "wl.labels")


def test_namespace_labels():
    assert L.namespace_labels("shop", {"team": "a"}) == {"team": "a", "kubernetes.io/metadata.name": "shop"}
    # the name label cannot be overridden
    assert L.namespace_labels("shop", {"kubernetes.io/metadata.name": "x"}) == {"kubernetes.io/metadata.name": "shop"}


def test_matches():
    lbl = {"app": "web", "tier": "front"}
    assert L.matches({"app": "web"}, lbl)
    assert L.matches({"app": "web", "tier": "front"}, lbl)
    assert not L.matches({"app": "db"}, lbl)
    assert not L.matches({"zone": "a"}, lbl)
    assert L.matches({}, lbl) and L.matches(None, lbl)
    assert not L.matches({"app": "web"}, None)


def test_selector_matches_expressions():
    lbl = {"app": "web", "env": "prod"}

    def sel(*e, **ml):
        return {"matchLabels": ml, "matchExpressions": list(e)}
    assert L.selector_matches(None, lbl) and L.selector_matches({}, lbl)
    assert L.selector_matches(sel(app="web"), lbl)
    assert L.selector_matches(sel({"key": "env", "operator": "In", "values": ["prod", "stage"]}), lbl)
    assert not L.selector_matches(sel({"key": "env", "operator": "In", "values": ["dev"]}), lbl)
    assert not L.selector_matches(sel({"key": "zone", "operator": "In", "values": ["a"]}), lbl)
    assert L.selector_matches(sel({"key": "env", "operator": "NotIn", "values": ["dev"]}), lbl)
    assert not L.selector_matches(sel({"key": "env", "operator": "NotIn", "values": ["prod"]}), lbl)
    assert L.selector_matches(sel({"key": "zone", "operator": "NotIn", "values": ["a"]}), lbl)   # absent key
    assert L.selector_matches(sel({"key": "app", "operator": "Exists"}), lbl)
    assert not L.selector_matches(sel({"key": "zone", "operator": "Exists"}), lbl)
    assert L.selector_matches(sel({"key": "zone", "operator": "DoesNotExist"}), lbl)
    assert not L.selector_matches(sel({"key": "app", "operator": "DoesNotExist"}), lbl)
    # matchLabels AND expressions
    assert not L.selector_matches(sel({"key": "app", "operator": "Exists"}, app="db"), lbl)
    with pytest.raises(ValueError, match="unknown operator 'Gt'"):
        L.selector_matches(sel({"key": "app", "operator": "Gt", "values": ["1"]}), lbl)


def test_validate_selector():
    L.validate_selector({"matchLabels": {"app": "web"},
                         "matchExpressions": [{"key": "env", "operator": "In", "values": ["a"]},
                                              {"key": "x", "operator": "Exists"}]}, "sel")
    with pytest.raises(ValueError, match=r"sel\.matchExpressions\[0\]\.values: operator In needs"):
        L.validate_selector({"matchExpressions": [{"key": "env", "operator": "In"}]}, "sel")
    with pytest.raises(ValueError, match=r"sel\.matchExpressions\[0\]\.values: must be empty for operator Exists"):
        L.validate_selector({"matchExpressions": [{"key": "env", "operator": "Exists", "values": ["a"]}]}, "sel")
    with pytest.raises(ValueError, match=r"sel\.matchExpressions\[0\]\.operator: 'in' is not one of"):
        L.validate_selector({"matchExpressions": [{"key": "env", "operator": "in", "values": ["a"]}]}, "sel")
    with pytest.raises(ValueError, match=r"sel: unknown key\(s\) app"):
        L.validate_selector({"app": "web"}, "sel")
    with pytest.raises(ValueError, match=r"sel\.matchLabels: label key"):
        L.validate_selector({"matchLabels": {"-x": "y"}}, "sel")
