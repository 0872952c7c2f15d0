"""`dualbrain serve`: an OpenAI-compatible server on the step engine, single-process or on Ray Serve.

Data flows one way: HTTP -> api.py (the OpenAI API: pydantic bodies in protocol.py, prompts, parameters,
errors, SSE; choices.py and output.py turn the engine's deltas into messages, reasoning and tool calls)
-> a backend: service.py's `EngineService` (one engine, in process: server.py) or a Ray Serve handle to
engine replicas that each hold one (ray_app.py) -> runtime/engine.py. metrics.py records either way.
The frameworks (FastAPI, uvicorn, prometheus-client, Ray) come with the `serve` extra and load only here.
"""
