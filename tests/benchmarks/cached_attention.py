"""The CachedAttention CPU kernel against the split form ONNX Runtime runs without it, one attention call alone.

    python tests/benchmarks/cached_attention.py [--reps 7]

Each shape is the exporter's form (`Attention` over Transpose(Concat(past, new)) K and V, a causal mask)
rewritten both ways (`ort_kernels.use_cpu_kernels`, `onnxruntime.split_attention`) into two sessions of two
threads; the calls alternate, each after a 256 MB write that flushes the L3, as a decode step's weights do
(and outlasts the other session's spinning threads, which would otherwise take the cores). Prints the median
µs a call of each and the largest difference between their outputs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

# (batch, query heads, K/V heads, new positions, past positions, head size)
SHAPES = [(1, 8, 2, 1, 64, 128), (1, 8, 2, 1, 2000, 128), (1, 8, 2, 1, 16000, 128), (8, 8, 2, 1, 500, 128),
          (1, 16, 2, 1, 8000, 256), (1, 8, 2, 256, 0, 128), (1, 8, 2, 1024, 0, 128)]


def _model(d: int):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "mask" else TensorProto.FLOAT, None)
              for n in ("q", "past_key", "new_key", "past_value", "new_value", "mask")]
    nodes = [helper.make_node("Concat", ["past_key", "new_key"], ["key_rows"], axis=0),
             helper.make_node("Transpose", ["key_rows"], ["key"], perm=[1, 2, 0, 3]),
             helper.make_node("Concat", ["past_value", "new_value"], ["value_rows"], axis=0),
             helper.make_node("Transpose", ["value_rows"], ["value"], perm=[1, 2, 0, 3]),
             helper.make_node("Attention", ["q", "key", "value", "mask"], ["o"], scale=d ** -0.5)]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def _session(model, library):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    from dualbrain.runtime.backends import ort_kernels
    from dualbrain.runtime.backends.onnxruntime import split_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    library = ort_kernels.library()
    if library is None:
        raise SystemExit("the CPU kernels are off or did not build")
    rng, flush = np.random.default_rng(0), np.ones(64 << 20, np.float32)
    print("| batch | q / kv heads | new | past | head | kernel µs | split µs | speedup | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b, hq, hkv, s, p, d in SHAPES:
        ours, split = _model(d), _model(d)
        assert ort_kernels.use_cpu_kernels(ours) == 1 and split_attention(split) == 1
        sessions = [_session(ours, library), _session(split, library)]
        feeds = {"q": rng.standard_normal((b, hq, s, d), np.float32),
                 **{n: rng.standard_normal((p, b, hkv, d), np.float32) for n in ("past_key", "past_value")},
                 **{n: rng.standard_normal((s, b, hkv, d), np.float32) for n in ("new_key", "new_value")},
                 "mask": np.tril(np.ones((s, p + s), bool), p)[None, None].repeat(b, 0)}
        outs = [sess.run(None, feeds)[0] for sess in sessions]
        times = [[], []]
        for _ in range(args.reps if s == 1 else max(3, args.reps // 2)):
            for i, sess in enumerate(sessions):
                flush += 1
                t = time.perf_counter()
                sess.run(None, feeds)
                times[i].append(time.perf_counter() - t)
        mine, theirs = (statistics.median(t) * 1e6 for t in times)
        print(f"| {b} | {hq} / {hkv} | {s} | {p} | {d} | {mine:.0f} | {theirs:.0f} | {theirs / mine:.2f}× "
              f"| {np.abs(outs[0] - outs[1]).max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
