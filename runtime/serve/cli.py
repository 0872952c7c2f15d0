"""`dualbrain serve`: the click command (registered by the main CLI with ``main.add_command(serve)``).
Light to import: the server's frameworks load only when the command runs."""
from __future__ import annotations

import os
from pathlib import Path

import click

from dualbrain.errors import DualbrainError
from dualbrain.runtime.solver import MODES as SOLVER_MODES


@click.command("serve")
@click.argument("model_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--small", "small_dir", type=click.Path(path_type=Path), default=None,
              help="Serve a pair: the small model's export (with --mode).")
@click.option("--mode", type=click.Choice(list(SOLVER_MODES)), default=None,
              help="The solver mode every request runs in (speculative and cascade need --small).")
@click.option("--bridges", "bridges_dir", type=click.Path(path_type=Path), default=None,
              help="With --mode fused: the export of the pair's bridges.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, default=8, show_default=True, help="Requests decoded together at most.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for a row at most; more get 503 with Retry-After.")
@click.option("--api-key", envvar="DUALBRAIN_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/ (also from DUALBRAIN_API_KEY).")
@click.option("--served-model-name", "name", default=None, help="The model's name in the API (default: OUT's name).")
@click.option("--max-body", type=int, default=8 * 2**20, show_default=True, help="Largest request body in bytes.")
@click.option("--ort-threads", type=int, default=None,
              help="ONNX Runtime threads per model (default: its own choice; with --ray, 1 per replica).")
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Serve: one ingress, engine replicas behind a handle.")
@click.option("--replicas", type=int, default=None, help="With --ray: engine replicas (default 1).")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="With --ray: autoscale the engine replicas.")
@click.option("--ray-address", default=None, help="With --ray: an existing cluster (default: start a local one).")
def serve(model_dir, small_dir, mode, bridges_dir, host, port, max_batch, max_queue, api_key, name, max_body,
          ort_threads, use_ray, replicas, autoscale, ray_address):
    """Serve the export in OUT with an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models, /health, /metrics), continuous batching on the step engine."""
    try:
        from dualbrain.runtime.serve.api import ApiSettings
        from dualbrain.runtime.serve.service import ServeConfig, check_dirs
    except ImportError as e:
        raise DualbrainError(f"serve needs the serve extra: pip install 'dualbrain[serve]' ({e})") from None

    if not use_ray and (replicas is not None or autoscale is not None or ray_address is not None):
        raise DualbrainError("--replicas, --autoscale and --ray-address need --ray")
    if max_body < 1:
        raise DualbrainError("--max-body must be positive")
    config = ServeConfig(str(model_dir), str(small_dir) if small_dir else None, mode,
                         str(bridges_dir) if bridges_dir else None, max_batch, max_queue,
                         ort_threads if ort_threads or not use_ray else 1)
    check_dirs(config)
    settings = ApiSettings(api_key=api_key or None, max_body=max_body)
    if use_ray:
        from dualbrain.runtime.serve.ray_app import Scale, run_ray

        run_ray(config, settings, Scale.parse(replicas, autoscale), host=host, port=port, name=name,
                address=ray_address)
    else:
        from dualbrain.runtime.serve.server import run_local

        click.echo(f"serving {model_dir} on http://{host}:{port}/v1 (pid {os.getpid()})", err=True)
        run_local(config, settings, host=host, port=port, name=name)
