"""What ONNX Runtime charges per node on this machine: a plain node, and the same node behind the decode /
prefill `If` that runtime/backends/ort_kernels.py puts around our MoE and int8 kernels.

Each graph is a chain of `--nodes` links over a (1, 1, hidden) float32 tensor (a decode step's hidden
state): `Relu` links, then the same links each wrapped as ort_kernels wraps a kernel (Size,
LessOrEqual and an `If` whose branches are `Relu` and `Sigmoid`: `_decode_or_prefill`, the code the
runtime uses). The two sessions take turns, `--rounds` times; the table gives the median µs per link
and the difference, which is what one `If` adds to a decode step.

    python tests/benchmarks/ort_node_costs.py [--nodes 60] [--hidden 1024] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from dualbrain.runtime.backends.ort_kernels import KERNEL_MAX_TOKENS, _decode_or_prefill, _Rewrite


def chain(nodes: int, hidden: int, behind_if: bool):
    """x -> `nodes` Relu links -> y; with `behind_if`, each link is If(small, Relu, Sigmoid)."""
    links = [helper.make_node("Relu", ["x" if i == 0 else f"h{i - 1}"], [f"h{i}"], name=f"link{i}")
             for i in range(nodes)]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, hidden])  # noqa: E731
    graph = helper.make_graph(links, "chain", [value("x")], [value(f"h{nodes - 1}")],
                              value_info=[value(f"h{i}") for i in range(nodes - 1)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    if behind_if:
        r = _Rewrite(model, ".")
        wrapped = []
        for link in links:
            x, y, p = link.input[0], link.output[0], link.name
            ours = helper.make_node("Relu", [x], [f"{p}/ours"], name=f"{p}/ours")
            theirs = helper.make_node("Sigmoid", [x], [f"{p}/theirs"], name=f"{p}/theirs")
            wrapped += _decode_or_prefill(r, x, KERNEL_MAX_TOKENS * hidden, y, p, ours, theirs)
        del model.graph.node[:]
        model.graph.node.extend(wrapped)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=500, help="session runs timed per round")
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {kind: ort.InferenceSession(chain(args.nodes, args.hidden, kind == "behind If").SerializeToString(),
                                           opts, providers=["CPUExecutionProvider"])
                for kind in ("plain", "behind If")}
    x = {"x": np.random.default_rng(0).standard_normal((1, 1, args.hidden)).astype(np.float32)}
    per_link: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for kind, sess in sessions.items():
            for _ in range(50):
                sess.run(None, x)
            t = time.perf_counter()
            for _ in range(args.calls):
                sess.run(None, x)
            per_link[kind].append((time.perf_counter() - t) / args.calls / args.nodes * 1e6)
    med = {k: statistics.median(v) for k, v in per_link.items()}
    print(f"| link ({args.nodes} per graph, hidden {args.hidden}, {args.threads} threads) | µs per link, median "
          f"of {args.rounds} | rounds |")
    print("|---|---|---|")
    for kind, v in per_link.items():
        print(f"| {kind} | {med[kind]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |")
    print(f"| what one If adds | {med['behind If'] - med['plain']:.2f} | |")


if __name__ == "__main__":
    main()
