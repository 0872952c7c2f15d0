"""`dualbrain serve --ray`: the same client tests as the single-process server (serve_cases.py), on a Ray
Serve application with 2 engine replicas, on one local cluster started for this module (fractional CPUs,
one ONNX Runtime thread per replica)."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from serve_cases import KEY, MAX_BODY, Live, free_port  # noqa: E402
from serve_cases import *  # noqa: E402,F401,F403  (the shared client tests)

from dualbrain.runtime.serve.api import ApiSettings  # noqa: E402
from dualbrain.runtime.serve.service import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def export(artifacts):
    return artifacts.export(artifacts.checkpoint("moe"))


@pytest.fixture(scope="module")
def live(export):
    from ray import serve

    from dualbrain.runtime.model import Model
    from dualbrain.runtime.serve.ray_app import APP_NAME, Scale, build_ray_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_ray_app(ServeConfig(str(export), max_batch=4, max_queue=64, ort_threads=1),
                            ApiSettings(api_key=KEY, max_body=MAX_BODY), Scale(replicas=2, cpus_per_replica=0.5),
                            "tiny-moe")
        serve.run(app, name=APP_NAME, route_prefix="/")
        yield Live(f"http://127.0.0.1:{port}", "tiny-moe", export, Model.load(export))
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_engine_replicas_serve(live):
    from ray import serve

    status = serve.status().applications["dualbrain"].deployments["engine"]
    assert status.status == "HEALTHY" and sum(status.replica_states.values()) == 2


def test_metrics_go_through_ray(live):
    import httpx

    r = httpx.get(live.url + "/metrics")          # each replica exports its own through Ray's metrics agent
    assert r.status_code == 404 and "Ray" in r.json()["error"]["message"]
