"""Scale-out on Ray Serve: the same API (api.py) in an ingress deployment, in front of engine replicas that
each load the export once and hold one `EngineService` (service.py), reached through a deployment handle.

    ingress (FastAPI, build_app)  --handle.options(stream=True).stream-->  EngineReplica x N (or autoscaled)

Each request is one streaming handle call: the replica streams the engine's `Delta`s and `Final`, the
ingress turns them into the OpenAI responses exactly as the single-process server does. Closing a
stream (a client gone) cancels the call, which closes the replica's generator, which cancels the engine
request. Replicas record their metrics with Ray's own (`ray.util.metrics`, exported per replica by Ray's
metrics agent); the ingress's /metrics says so.
"""
from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from dualbrain.errors import DualbrainError
from dualbrain.runtime.serve.api import ApiSettings, ModelInfo, build_app
from dualbrain.runtime.serve.service import Busy, EngineService, ServeConfig

APP_NAME = "dualbrain"


@dataclass(frozen=True)
class Scale:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None      # (min, max) replicas
    cpus_per_replica: float = 1.0                 # Ray's logical CPUs (fractions allowed: tests share 2 cores)

    @classmethod
    def parse(cls, replicas: int | None, autoscale: str | None) -> "Scale":
        if replicas is not None and autoscale is not None:
            raise DualbrainError("give --replicas or --autoscale, not both")
        if autoscale is None:
            if replicas is not None and replicas < 1:
                raise DualbrainError("--replicas must be at least 1")
            return cls(replicas or 1)
        try:
            lo, hi = (int(x) for x in autoscale.split(":"))
        except ValueError:
            raise DualbrainError(f"--autoscale takes MIN:MAX replicas, got {autoscale!r}") from None
        if not 0 < lo <= hi:
            raise DualbrainError(f"--autoscale {autoscale}: need 0 < MIN <= MAX")
        return cls(autoscale=(lo, hi))

    def options(self, config: ServeConfig) -> dict:
        """The engine deployment's options: replicas, and requests each takes before Ray queues them
        (its rows and its own queue, so the replica's bounded queue is the one that answers 503)."""
        count = ({"autoscaling_config": {"min_replicas": self.autoscale[0], "max_replicas": self.autoscale[1],
                                         "target_ongoing_requests": config.max_batch}}
                 if self.autoscale else {"num_replicas": self.replicas})
        return {**count, "max_ongoing_requests": config.max_batch + config.max_queue,
                "ray_actor_options": {"num_cpus": self.cpus_per_replica}}


class EngineReplica:
    def __init__(self, config: ServeConfig):
        from dualbrain.runtime.serve.metrics import RayMetrics

        self.service = EngineService(config, RayMetrics())

    async def stream(self, prompt_ids: list[int], params, logprobs: int | None):
        async for ev in self.service.stream(prompt_ids, params, logprobs):
            yield ev

    def __del__(self):
        self.service.close()


class HandleBackend:
    """api.py's backend over the engine replicas' handle."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)

    async def stream(self, prompt_ids, params, logprobs=None):
        from ray.serve.exceptions import BackPressureError

        response = self.handle.stream.remote(prompt_ids, params, logprobs)
        try:
            async for ev in response:
                yield ev
        except BackPressureError as e:
            raise Busy(str(e)) from None
        finally:
            response.cancel()

    def metrics_text(self):
        return None


class Ingress:
    def __init__(self, engine, config: ServeConfig, settings: ApiSettings, name: str | None):
        self.backend = HandleBackend(engine)
        self.info = ModelInfo.read(config.model_dir, name, solver=config.mode is not None)
        self.settings = settings

    def __serve_build_asgi_app__(self):          # Ray Serve builds the app on the replica, after __init__
        return build_app(self.backend, self.info, self.settings)


def build_ray_app(config: ServeConfig, settings: ApiSettings, scale: Scale, name: str | None = None):
    """The Ray Serve application: the ingress bound to the engine deployment."""
    from ray import serve

    engine = serve.deployment(EngineReplica, name="engine", **scale.options(config))
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", max_ongoing_requests=10_000,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(config), config, settings, name)


def run_ray(config: ServeConfig, settings: ApiSettings, scale: Scale, *, host: str, port: int,
            name: str | None = None, address: str | None = None) -> None:
    """Deploy on a local cluster (or the one at `address`) and serve until SIGTERM or SIGINT, which shut
    the application down gracefully (replicas finish their requests)."""
    import click
    import ray
    from ray import serve

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_ray_app(config, settings, scale, name), name=APP_NAME, route_prefix="/")
    click.echo(f"serving {config.model_dir} on http://{host}:{port}/v1 with Ray Serve "
               f"({f'{scale.autoscale[0]}..{scale.autoscale[1]}' if scale.autoscale else scale.replicas} "
               f"engine replicas)", err=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()
