"""The lightweight runtime: numpy + ONNX Runtime + tokenizers + jinja2 (never torch or transformers).

    from dualbrain.runtime import Model, SamplingParams, generate
    model = Model.load("out")
    ids = model.tokenizer.encode(model.tokenizer.render([{"role": "user", "content": "Hi"}]))
    print(generate(model, [ids], SamplingParams(greedy=True, max_new_tokens=32))[0].text)
"""
from dualbrain.runtime.engine import Engine, Request
from dualbrain.runtime.generate import Generation, GenerationStats, decode_one, generate, prefill
from dualbrain.runtime.model import Model, State
from dualbrain.runtime.sampling import SamplingParams

__all__ = ["Model", "State", "SamplingParams", "Engine", "Request", "Generation", "GenerationStats", "generate",
           "prefill", "decode_one"]
