"""Per-block accuracy diff: exported blocks vs transformers' own modeling code.

Each exported block is fed the reference's own inputs to that block, captured from transformers
during a prefill step and a decode step (hidden states entering each decoder layer, and the
cache the reference held before the step); its outputs (hidden states, new conv / recurrent
state, the step's K/V, logits) are compared with the reference's. The error reported is
`max|out - ref| / max|ref|`; the pass/fail decision is polygraphy's comparator with
`atol = tolerance * max|ref|` on the max error.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dualbrain.errors import DualbrainError
from dualbrain.runtime.blocks import KINDS, model_feeds, random_feeds
from dualbrain.runtime.dtypes import torch_dtype

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-5, "float16": 2e-2}


@dataclass
class DiffRow:
    block: str
    output: str
    step: str
    max_abs: float
    rel: float
    tolerance: float
    ok: bool

    def to_json(self) -> dict:
        return asdict(self)


def _compare(name: str, out: np.ndarray, ref: np.ndarray, tol: float) -> tuple[float, float, bool]:
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if out.shape != ref.shape:
        raise DualbrainError(f"diff: output {name} has shape {out.shape}, reference {ref.shape}")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(np.abs(out - ref).max()) if ref.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    G_LOGGER.module_severity = G_LOGGER.CRITICAL
    compare = SimpleCompareFunc(atol={name: tol * max(scale, 1e-30)}, rtol={name: 0.0}, check_error_stat="max",
                                 check_shapes=True)
    result = compare(IterationResult({name: out}, runner_name="dualbrain"),
                     IterationResult({name: ref}, runner_name="transformers"))
    return max_abs, rel, bool(result[name])


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()  # the cache mutates its tensors in place


def diff(checkpoint: str | Path, export_dir: str | Path, *, prompt_len: int = 11, batch: int = 2, seed: int = 0,
         tolerance: float | None = None, backend: str = "onnxruntime") -> list[DiffRow]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    # the reference's "falling back to the PyTorch implementation" notices and load bars are noise here
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    from dualbrain.runtime.model import Model
    from dualbrain.runtime.spec import ModelSpec

    model = Model.load(export_dir, backend=backend)
    spec = ModelSpec.from_dir(checkpoint)
    if model.spec != spec:
        raise DualbrainError("the export was made from a different model configuration than this checkpoint")
    dtype = model.manifest.dtype
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    # bf16 exports compute in fp32 on ONNX Runtime's CPU build: the reference uses the same bf16 weights in fp32
    ref = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch_dtype(dtype)).eval()
    if dtype == "bfloat16" and model.dtype == "float32":
        ref = ref.float()
    lm = ref.model.language_model if hasattr(ref.model, "language_model") else ref.model
    captured: dict[int, tuple] = {}

    def hook(i):
        def fn(mod, args, kwargs, output):
            captured[i] = (kwargs.get("hidden_states", args[0] if args else None), output)
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, prompt_len), generator=g)
    nxt = torch.randint(0, spec.vocab_size, (batch, 1), generator=g)
    rows: list[DiffRow] = []

    def add(block, output, step, out, refv):
        max_abs, rel, ok = _compare(f"{block}.{output}", out, refv, tol)
        rows.append(DiffRow(block, output, step, max_abs, rel, tol, ok))

    def states_of(cache):
        return {b.layer: {k: _np(v) for k, v in KINDS[b.kind].read_reference_state(cache, b.layer, spec).items()}
                for b in model.layers}

    try:
        with torch.no_grad():
            steps = []
            out = ref(input_ids=ids, use_cache=True)
            steps.append(("prefill", ids, dict(captured), None, states_of(out.past_key_values), out.logits))
            cache = out.past_key_values
            before = states_of(cache)
            out2 = ref(input_ids=nxt, past_key_values=cache, use_cache=True)
            steps.append(("decode", nxt, dict(captured), before, states_of(out2.past_key_values), out2.logits))
    finally:
        for h in handles:
            h.remove()

    cdt = model.np_dtype(model.manifest.dtype)
    for step, step_ids, caps, before, after, logits in steps:
        b, t = step_ids.shape
        past = 0 if before is None else prompt_len
        embed, head = KINDS[model.embed.kind], KINDS[model.head.kind]
        emb = model.backend.run(model.embed, model_feeds(model.embed.inputs, input_ids=step_ids.numpy()))
        add(model.embed.name, embed.gives, step, emb[embed.gives], _np(caps[0][0]))
        mask = np.ones((b, past + t), np.int64)
        pos = np.broadcast_to(np.arange(past, past + t, dtype=np.int64), (b, t)).copy()
        empty = model.new_state(b)
        for i, block in enumerate(model.layers):
            feeds = {KINDS[block.kind].takes: _np(caps[i][0]).astype(cdt),
                     **model_feeds(block.inputs, attention_mask=mask, position_ids=pos)}
            for s in block.state:
                feeds[s.input] = empty.feeds(i)[s.input] if before is None else \
                    before[i][s.input].astype(model.np_dtype(s.dtype))
            res = model.backend.run(block, feeds)
            gives = KINDS[block.kind].gives
            add(block.name, gives, step, res[gives], _np(caps[i][1]))
            for s in block.state:
                # appended states return only this step's positions: the reference's last t
                add(block.name, s.output, step, res[s.output], after[i][s.input][-t:] if s.append else after[i][s.input])
        # the head sees the last layer's output, before the final norm
        last_hidden = _np(caps[len(model.layers) - 1][1]).astype(cdt)
        res = model.backend.run(model.head, {head.takes: last_hidden})
        add(model.head.name, head.gives, step, res[head.gives], _np(logits))
    return rows


def first_failure(rows: list[DiffRow]) -> DiffRow | None:
    return next((r for r in rows if not r.ok), None)


def diff_backends(export_dir: str | Path, engines: str | Path, *, tolerance: float | None = None) -> list[DiffRow]:
    """ONNX Runtime vs TensorRT engines, block by block, on the same random inputs.

    Needs a GPU that can run the engines (TensorRT-RTX engines do not run on Hopper).
    """
    from dualbrain.runtime.model import Model

    ort_model = Model.load(export_dir, linked=False)
    trt_model = Model.load(export_dir, backend="tensorrt", engines=engines)
    tol = tolerance if tolerance is not None else TOLERANCE[ort_model.manifest.dtype]
    rows = []
    for block in ort_model.manifest.blocks:
        feeds = random_feeds(block.inputs, ort_model.vocab_size, float_dtype=ort_model.np_dtype)
        ref = ort_model.backend.run(block, feeds)
        out = trt_model.backend.run(block, feeds)
        for name, r in ref.items():
            max_abs, rel, ok = _compare(f"{block.name}.{name}", out[name], r, tol)
            rows.append(DiffRow(block.name, name, "random", max_abs, rel, tol, ok))
    return rows
