# -*- coding: utf-8 -*-
# Copyright: kldload.netstack contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Kubernetes label syntax and label selectors, with Kubernetes' rules. No Ansible imports.

- A key is ``[prefix/]name``: the optional prefix a DNS subdomain (<= 253 characters, lowercase
  RFC 1123 labels joined by dots), the name <= 63 characters of ``[A-Za-z0-9_.-]`` beginning and
  ending with an alphanumeric character.
- A value is empty, or <= 63 characters of the same pattern as a name.
- ``matches(selector, labels)``: a matchLabels-style dict (every pair present; an empty selector
  matches everything, like a Service's ``selector: {}`` would select all pods - callers that want
  "no selector selects nothing" check for that themselves).
- ``selector_matches({"matchLabels": ..., "matchExpressions": [...]}, labels)``: a LabelSelector
  with the operators In, NotIn, Exists, DoesNotExist (NotIn and DoesNotExist match labels without the
  key, as in Kubernetes).
- Namespaces carry ``kubernetes.io/metadata.name=<name>`` (``namespace_labels``), as the API server
  sets it on every namespace.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import re

NAME_MAX = 63
PREFIX_MAX = 253
VALUE_MAX = 63
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_NAME_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
_IANA_SVC_NAME_RE = re.compile(r"^[-a-z0-9]+$")
_DNS1123_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

NAME_RULE = ("at most %d characters: alphanumerics, '-', '_' or '.', beginning and ending with an "
             "alphanumeric character (regex (([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]))" % NAME_MAX)
PREFIX_RULE = ("a DNS subdomain of at most %d characters: lowercase alphanumerics, '-' and '.', each part "
               "beginning and ending with an alphanumeric character" % PREFIX_MAX)


def key_error(key):
    """Why ``key`` is not a valid label key (text), or None when it is."""
    if not isinstance(key, str):
        return "a label key must be a string, not %s" % type(key).__name__
    if not key:
        return "a label key must not be empty"
    prefix, sep, name = key.rpartition("/")
    if sep:
        if not prefix:
            return "the prefix before '/' must not be empty"
        if len(prefix) > PREFIX_MAX or not _DNS1123_SUBDOMAIN_RE.match(prefix):
            return "the prefix %r must be %s" % (prefix, PREFIX_RULE)
    if not name:
        return "the name part must not be empty"
    if len(name) > NAME_MAX or not _NAME_RE.match(name):
        return "the name part %r must be %s" % (name, NAME_RULE)
    return None


def value_error(value):
    """Why ``value`` is not a valid label value (text), or None when it is."""
    if not isinstance(value, str):
        return "a label value must be a string, not %s (quote it in YAML)" % type(value).__name__
    if value == "":
        return None
    if len(value) > VALUE_MAX or not _NAME_RE.match(value):
        return "a label value must be empty or %s" % NAME_RULE
    return None


def valid_key(key):
    return key_error(key) is None


def valid_value(value):
    return value_error(value) is None


def validate_labels(labels, where):
    """Check a label dict; ValueError naming the field (``where`` + ``.<key>``) and the rule broken.
    None counts as no labels. Returns the labels as a plain dict."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValueError("%s: labels must be a mapping of key to value, not %s" % (where, type(labels).__name__))
    for k in sorted(labels, key=str):
        err = key_error(k)
        if err:
            raise ValueError("%s: label key %r is invalid: %s" % (where, k, err))
        err = value_error(labels[k])
        if err:
            raise ValueError("%s.%s: label value %r is invalid: %s" % (where, k, labels[k], err))
    return dict(labels)


def namespace_labels(name, labels=None):
    """The labels of namespace ``name``: its own plus ``kubernetes.io/metadata.name=<name>`` (which
    always wins, as the API server enforces it)."""
    out = dict(labels or {})
    out[NAMESPACE_NAME_LABEL] = name
    return out


def matches(selector, labels):
    """True when every ``key: value`` of the matchLabels-style dict ``selector`` is in ``labels``."""
    labels = labels or {}
    for k, v in (selector or {}).items():
        if k not in labels or labels[k] != v:
            return False
    return True


def validate_selector(selector, where):
    """Check a LabelSelector ``{matchLabels, matchExpressions}``; ValueError naming the field."""
    if selector is None:
        return
    if not isinstance(selector, dict):
        raise ValueError("%s: a label selector must be a mapping, not %s" % (where, type(selector).__name__))
    unknown = sorted(set(selector) - set(("matchLabels", "matchExpressions")))
    if unknown:
        raise ValueError("%s: unknown key(s) %s (a selector has matchLabels and matchExpressions)"
                         % (where, ", ".join(unknown)))
    validate_labels(selector.get("matchLabels"), where + ".matchLabels")
    exprs = selector.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise ValueError("%s.matchExpressions: must be a list" % where)
    for i, e in enumerate(exprs):
        w = "%s.matchExpressions[%d]" % (where, i)
        if not isinstance(e, dict):
            raise ValueError("%s: must be a mapping with key, operator and values" % w)
        unknown = sorted(set(e) - set(("key", "operator", "values")))
        if unknown:
            raise ValueError("%s: unknown key(s) %s" % (w, ", ".join(unknown)))
        err = key_error(e.get("key"))
        if err:
            raise ValueError("%s.key: %s" % (w, err))
        op = e.get("operator")
        if op not in OPERATORS:
            raise ValueError("%s.operator: %r is not one of %s" % (w, op, ", ".join(OPERATORS)))
        values = e.get("values")
        if op in ("In", "NotIn"):
            if not values or not isinstance(values, list):
                raise ValueError("%s.values: operator %s needs a non-empty list of values" % (w, op))
            for j, v in enumerate(values):
                err = value_error(v)
                if err:
                    raise ValueError("%s.values[%d]: %s" % (w, j, err))
        elif values:
            raise ValueError("%s.values: must be empty for operator %s" % (w, op))


def selector_matches(selector, labels):
    """True when ``labels`` satisfy the LabelSelector ``selector`` (matchLabels AND every
    matchExpression). An empty or None selector matches everything (Kubernetes' ``{}``).
    Raises ValueError for an unknown operator."""
    labels = labels or {}
    selector = selector or {}
    if not matches(selector.get("matchLabels"), labels):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise ValueError("label selector: unknown operator %r (one of %s)" % (op, ", ".join(OPERATORS)))
        if not ok:
            return False
    return True


def iana_svc_name_error(name):
    """Why ``name`` is not an IANA_SVC_NAME (Kubernetes' port names), or None."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > 15:
        return "must be at most 15 characters"
    if not _IANA_SVC_NAME_RE.match(name):
        return "must contain only lowercase alphanumerics and '-'"
    if not re.search(r"[a-z]", name):
        return "must contain at least one letter"
    if name.startswith("-") or name.endswith("-") or "--" in name:
        return "must not begin or end with '-' nor contain '--'"
    return None
