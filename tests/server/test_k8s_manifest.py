"""docs/k8s/deployment.yaml names what the server really serves: its probes GET routes the app has, on the port
its `llmengine serve` arguments open, and the Service sends traffic there."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from llmengine_runtime.server.app import create_app
from llmengine_runtime.server.serve import add_serve_args

MANIFEST = Path(__file__).resolve().parents[2] / "docs" / "k8s" / "deployment.yaml"


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text())}


def test_probes_are_routes_the_app_serves_on_its_port():
    docs = documents()
    [container] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    command, *args = container["args"]
    assert command == "serve"
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    options = parser.parse_args(args)  # every flag the manifest passes exists
    assert options.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [options.port]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == options.port

    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {probe["port"] for probe in probes.values()} == {options.port}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    engine = FakeEngine()
    with TestClient(create_app({"fake": engine}, api_key="k")) as client:  # probes carry no key
        for probe in probes.values():
            assert client.get(probe["path"]).status_code == 200, probe
        engine.failed = "worker died"
        for probe in probes.values():
            assert client.get(probe["path"]).status_code == 503, probe


def test_metrics_annotation_names_the_metrics_route():
    annotations = documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    with TestClient(create_app({"fake": FakeEngine()})) as client:
        r = client.get(annotations["prometheus.io/path"])
        assert r.status_code == 200 and "llmengine_requests_in_flight" in r.text
