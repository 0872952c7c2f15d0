"""Fused mode's cost on a mid-size pair: fused ms/token against the large model alone + the small one
alone, measured in one run (`dualbrain bench --solver`'s figures), and the overlap the small model on
its own thread achieves.

    python tests/benchmarks/fused_cost.py [--workdir DIR] [--new-tokens 64] [--prompts 3]

The pair: the mid-size MoE (`make-tiny --family moe --preset mid`: hidden 1024, 12 layers, 64 experts
top-8, vocab 32000, 2.8 GB fp32) and a dense small model of the same family at about a third of its
per-token cost (hidden 512, 4 layers, vocab 32000). Bridges (random weights, open gates: the cost does
not depend on training) after every 4th large layer, CALM's layout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dualbrain-fused-cost"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=3)
    args = ap.parse_args()

    import torch

    from dualbrain.runtime.solver.bench import SolverBenchConfig, bench_solver, print_solver_report
    from dualbrain.exporter.align import new_config, write_bridges
    from dualbrain.exporter.blocks.bridge import Bridge
    from dualbrain.exporter.export import export_bridges, export_checkpoint
    from dualbrain.exporter.tiny import make_tiny

    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    large, small = w / "large", w / "small"
    if not large.exists():
        make_tiny(large, family="moe", preset="mid")
    if not small.exists():
        make_tiny(small, family="dense", preset="mid", hidden_size=512, num_layers=4, seed=1)
    for ckpt in (large, small):
        if not (w / f"{ckpt.name}.onnx").exists():
            export_checkpoint(ckpt, w / f"{ckpt.name}.onnx")
    if not (w / "bridges.onnx").exists():
        cfg = new_config(small, large, heads=8, head_dim=64)
        bridges = [Bridge(cfg.shape, seed=i) for i in range(len(cfg.links))]
        for b in bridges:
            torch.nn.init.constant_(b.gate, 0.5)
        write_bridges(w / "bridges", cfg, bridges)
        export_bridges(w / "bridges", w / "bridges.onnx")
    report = bench_solver(w / "large.onnx", w / "small.onnx", w / "bridges.onnx", modes=("fused",),
                          cfg=SolverBenchConfig(new_tokens=args.new_tokens, prompts=args.prompts))
    print(json.dumps(report, indent=1))
    print_solver_report(report)


if __name__ == "__main__":
    main()
