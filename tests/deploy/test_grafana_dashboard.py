"""deploy/grafana/facepq-dashboard.json: valid dashboard JSON whose every query names metrics the servers export."""
from __future__ import annotations

import json
import re

from tests.support.processes import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "facepq-dashboard.json"


def _exported_names() -> set[str]:
    """Every metric family query_node.metrics defines (counters with _total, histograms with _bucket...)."""
    from prometheus_client import REGISTRY

    import query_node.metrics as metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    names = set()
    for family in REGISTRY.collect():  # labelled families have no samples before their first use: by type
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    source = (REPO_ROOT / "query_node" / "metrics.py").read_text()
    names |= set(re.findall(r'\("(facepq_[a-z_]+)"', source))  # gauges made at scrape time
    assert metrics.REQUESTS  # imported for its registrations
    return names


def test_every_panel_queries_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "facepq" and dashboard["panels"]
    exported = _exported_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\bfacepq_[a-z_]+", target["expr"]))
    missing = {m for m in used if m not in exported}
    assert not missing, f"the dashboard queries metrics no server exports: {sorted(missing)}"
    assert {"facepq_requests_total", "facepq_node_scan_seconds_bucket", "facepq_shard_healthy_replicas",
            "facepq_index_version"} <= used
