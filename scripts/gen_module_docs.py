"""Render docs/modules.md from the modules' DOCUMENTATION/EXAMPLES/RETURN (via ansible-doc --json).

    .venv/bin/python scripts/gen_module_docs.py          # rewrite docs/modules.md
    .venv/bin/python scripts/gen_module_docs.py --check  # exit 1 if docs/modules.md is stale
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "modules.md"


def _text(value):
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)


def _options(opts, depth=0):
    rows = []
    for name in sorted(opts):
        o = opts[name]
        typ = o.get("type", "str")
        if o.get("elements"):
            typ += " of " + o["elements"]
        extra = []
        if o.get("required"):
            extra.append("required")
        if "default" in o and o["default"] is not None:
            extra.append("default `%s`" % json.dumps(o["default"]))
        if o.get("choices"):
            extra.append("choices: " + ", ".join("`%s`" % c for c in o["choices"]))
        desc = _text(o.get("description")).replace("|", "\\|")
        rows.append("| %s`%s` | %s | %s | %s |" % ("&nbsp;&nbsp;" * depth, name, typ, "; ".join(extra), desc))
        if o.get("suboptions"):
            rows += _options(o["suboptions"], depth + 1)
    return rows


def render():
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    names = sorted(p.stem for p in (REPO / "plugins" / "modules").glob("*.py") if not p.stem.startswith("_"))
    fq = ["kldload.netstack.%s" % n for n in names]
    data = json.loads(subprocess.run([str(REPO / ".venv" / "bin" / "ansible-doc"), "--json", "-t", "module"] + fq,
                                     cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout)
    out = ["# Module reference", "", "Generated from each module's DOCUMENTATION, EXAMPLES and RETURN by",
           "`scripts/gen_module_docs.py`; do not edit by hand.", ""]
    for name in fq:
        d = data[name]["doc"]
        out += ["## %s" % name, "", _text(d.get("short_description")), ""]
        out += ["- " + _text(x) for x in (d.get("description") or [])]
        out += ["", "| option | type | | description |", "|---|---|---|---|"]
        out += _options(d.get("options") or {})
        if d.get("notes"):
            out += ["", "Notes:", ""] + ["- " + _text(n) for n in d["notes"]]
        out += ["", "Examples:", "", "```yaml", (data[name].get("examples") or "").strip(), "```", ""]
        ret = data[name].get("return") or {}
        if ret:
            out += ["Returns:", "", "| key | type | returned | description |", "|---|---|---|---|"]
            for k in sorted(ret):
                r = ret[k]
                desc = _text(r.get("description")).replace("|", "\\|")
                out.append("| `%s` | %s | %s | %s |" % (k, r.get("type", ""), _text(r.get("returned")), desc))
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def main():
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print("docs/modules.md is stale: run .venv/bin/python scripts/gen_module_docs.py")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
