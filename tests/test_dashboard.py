"""The Grafana dashboard: the committed JSON is what `omni-ctl dashboard`
prints, and every metric its panels query is exported by a real proxy."""

import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from omni_ctl import dashboard

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "omni-proxy.json"


def test_committed_dashboard_is_the_generated_one():
    assert COMMITTED.read_text() == dashboard.render(), \
        "run: omni-ctl dashboard > docs/grafana/omni-proxy.json"
    dash = json.loads(COMMITTED.read_text())
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_every_queried_metric_exists_in_the_proxys_metrics(omni_nginx):
    proxy = omni_nginx()
    resp = proxy.get("/metrics")
    assert resp.status == 200
    exported = {fam.name for fam in text_string_to_metric_families(resp.text)}
    # prometheus_client drops a counter's _total from the family name
    exported |= {n + "_total" for n in exported}
    queried = dashboard.queried_metrics(dashboard.dashboard())
    assert queried, "the dashboard queries nothing"
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics the proxy does not export: {missing}"
