"""The Grafana dashboard: checked against Grafana's own dashboard schema (the TypeScript types in
the npm package @grafana/schema, with tsc), and built to work on any Prometheus (compose, or a
Kubernetes ServiceMonitor whose job is the Service name)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tagstream-dashboard.json"
NODE_MODULES = ROOT / ".tools" / "node" / "node_modules"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCOPE = ('job=~"$job"', 'namespace=~"$namespace"', 'pod=~"$pod"')
SELECTOR_RE = re.compile(r"\b((?:tagstream|process|python)_[a-z0-9_]+)\b(\{[^}]*\})?")

# JSON holds an enum's value, never the TypeScript enum member: `"mode": "palette-classic"` in
# every dashboard Grafana exports is not assignable to the string enum FieldColorModeId. Json<T>
# maps string enums to their literal values (a misspelled value still fails) and leaves every
# other type, required field and excess-property check of Dashboard as it is.
CHECK_TS = """\
import type {{ Dashboard }} from "@grafana/schema";
type Json<T> = T extends string ? `${{T}}`
  : T extends readonly (infer U)[] ? Json<U>[]
  : T extends object ? {{ [K in keyof T]: Json<T[K]> }}
  : T;
const dashboard = {literal} satisfies Json<Dashboard>;
export {{ dashboard }};
"""


def _load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _tsc() -> tuple[Path, Path]:
    """tsc and the node_modules holding @grafana/schema; skipped, like helm, when not installed."""
    env = os.environ.get("TSC")
    tsc = Path(env) if env else NODE_MODULES / ".bin" / "tsc"
    modules = tsc.parent.parent if env else NODE_MODULES
    if not (modules / "@grafana" / "schema" / "package.json").is_file():
        modules = NODE_MODULES
    if not tsc.is_file() or not (modules / "@grafana" / "schema" / "package.json").is_file():
        pytest.skip("tsc or @grafana/schema not installed: run `make tools` (make test does)")
    return tsc, modules


def schema_errors(dashboard: dict[str, Any], workdir: Path) -> str:
    """tsc's errors for the dashboard as an object literal typed `satisfies Dashboard` (literal
    types and excess-property checks apply); empty when Grafana's types accept it."""
    tsc, modules = _tsc()
    (workdir / "node_modules").symlink_to(modules, target_is_directory=True)
    check = workdir / "check.ts"
    check.write_text(CHECK_TS.format(literal=json.dumps(dashboard, indent=1)))
    args = [str(tsc), "--noEmit", "--strict", "--pretty", "false"]
    args += ["--module", "preserve", "--moduleResolution", "bundler", str(check)]
    out = subprocess.run(args, capture_output=True, text=True, cwd=workdir, timeout=120)
    errors = (out.stdout + out.stderr).strip()
    assert (out.returncode == 0) == (not errors), f"tsc rc={out.returncode}: {errors}"
    return errors


def test_dashboard_matches_grafana_schema(tmp_path: Path) -> None:
    assert schema_errors(_load(), tmp_path) == ""


def test_schema_check_rejects_a_broken_dashboard(tmp_path: Path) -> None:
    """The check must be able to fail: a misspelled panel key and a wrong type are both caught."""
    broken = copy.deepcopy(_load())
    panel = broken["panels"][0]
    panel["gridPosition"] = panel.pop("gridPos")
    broken["panels"][1]["gridPos"]["w"] = "6"
    errors = schema_errors(broken, tmp_path)
    assert "'\"gridPosition\"' does not exist in type" in errors, errors
    assert "Type 'string' is not assignable to type 'number'" in errors, errors


def test_dashboard_follows_the_datasource_and_scope_variables() -> None:
    """Hard-coded datasource uids and job="tagstream" left panels empty under the Helm chart."""
    dash = _load()
    assert dash["uid"] == "tagstream"
    for panel in dash["panels"]:
        targets = panel.get("targets", [])
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            for name, selector in SELECTOR_RE.findall(target["expr"]):
                for matcher in SCOPE:
                    assert matcher in selector, f"{panel['title']}: {name}{selector}"
            if "DCGM_FI_DEV_" in target["expr"]:
                assert 'pod=~"$pod"' in target["expr"], panel["title"]
                assert 'exported_pod=~"$pod"' in target["expr"], panel["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "namespace", "pod"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DATASOURCE
        assert "tagstream_build_info" in var["query"]
        assert var["multi"] and var["includeAll"] and var["allValue"] == ".*"
        assert var["current"]["value"] == ["$__all"]
    assert variables["prompt_usd_per_mtok"]["query"] == "0.15"
    assert variables["completion_usd_per_mtok"]["query"] == "0.60"


def test_dashboard_owner_panels_and_grid() -> None:
    """What an owner reads first sits in the top row; no two panels overlap."""
    panels = _load()["panels"]
    top = {p["title"] for p in panels if p["gridPos"]["y"] == 0}
    assert {"Share sent to the LLM", "Needs-review share", "LLM cost /day"} <= top
    cost = next(p for p in panels if p["title"] == "LLM cost /day")
    assert cost["fieldConfig"]["defaults"]["unit"] == "currencyUSD"
    assert {"$prompt_usd_per_mtok", "$completion_usd_per_mtok"} <= set(
        re.findall(r"\$\w+", cost["targets"][0]["expr"])
    )
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
