"""The export's structure: manifest, single custom nodes, external data, linked graph, window states."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from dualbrain.exporter.checkpoint import Checkpoint  # noqa: E402
from dualbrain.runtime.generate import decode_one, prefill  # noqa: E402
from dualbrain.runtime.manifest import load_manifest  # noqa: E402
from dualbrain.runtime.model import Model  # noqa: E402


@pytest.fixture(scope="module")
def moe_export(artifacts):
    return artifacts.export(artifacts.checkpoint("moe", "conditional"))


def test_manifest_describes_blocks_and_state(moe_export):
    man = load_manifest(moe_export, verify_hashes=True)
    kinds = [b.kind for b in man.blocks]
    assert kinds == ["embed", "linear_attention", "linear_attention", "linear_attention", "full_attention", "head",
                     "mtp"]      # the published layout ships an MTP head: a side block after the chain
    assert [b.kind for b in man.chain] == kinds[:-1]
    gdn = man.blocks[1]
    assert [s.input for s in gdn.state] == ["conv_state", "recurrent_state"]
    assert gdn.state[1].dtype == "float32" and gdn.state[1].shape == ("batch", 4, 16, 24)
    att = man.blocks[4]
    assert [s.input for s in att.state] == ["past_key", "past_value"]
    assert man.dtype == "float32" and man.linked == "model.onnx"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(man.tokenizer_files)
    assert all(f in man.files for f in man.tokenizer_files)


def test_custom_ops_are_single_nodes_with_functions(moe_export):
    gdn = onnx.load(str(moe_export / "layer_000.onnx"), load_external_data=False)
    att = onnx.load(str(moe_export / "layer_003.onnx"), load_external_data=False)
    for model, expected in ((gdn, {"CausalConv1d", "GatedDeltaRule", "MoEDispatch"}), (att, {"MoEDispatch"})):
        custom = [n.op_type for n in model.graph.node if n.domain == "dualbrain"]
        assert sorted(custom) == sorted(expected)      # one node each
        assert {f.name for f in model.functions} == expected
        # weights live in external data, not in the graph file
        big = [t for t in model.graph.initializer if np.prod(t.dims) > 256]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)


def test_linked_graph_matches_blocks(moe_export):
    linked, blocks = Model.load(moe_export), Model.load(moe_export, linked=False)
    assert linked.backend.has_linked and not blocks.backend.has_linked
    prompts = [[5, 9, 200, 7], [11, 3]]
    (s1, l1), (s2, l2) = prefill(linked, prompts), prefill(blocks, prompts)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    for _ in range(3):
        tok = l1.argmax(-1)
        l1, l2 = decode_one(linked, s1, tok), decode_one(blocks, s2, tok)
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)


def test_expert_formats_read_identically(artifacts):
    a = Checkpoint(artifacts.checkpoint("moe", "causal", "stacked"))
    b = Checkpoint(artifacts.checkpoint("moe", "causal", "per_expert"))
    wa, wb = a.layer_weights(0), b.layer_weights(0)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k
    assert "mlp.experts.0.gate_proj.weight" not in wa


def test_window_states_match_stepwise(artifacts):
    """The window variant's per-position states equal the states after feeding each prefix."""
    out = artifacts.export(artifacts.checkpoint("dense", "causal"))
    model = Model.load(out, linked=False)
    block = model.layers[0]
    assert block.state[0].window_output == "conv_states"
    rng = np.random.default_rng(0)
    t, h = 6, model.spec.hidden_size
    hidden = rng.standard_normal((2, t, h)).astype(np.float32)
    zeros = model.new_state(2).layers[0]
    full = model.backend.run(block, {"hidden": hidden, "attention_mask": np.ones((2, t), np.int64), **zeros},
                             window=True)
    st = dict(zeros)
    for i in range(t):
        step = model.backend.run(block, {"hidden": hidden[:, i:i + 1], "attention_mask": np.ones((2, i + 1), np.int64),
                                         **st})
        st = {"conv_state": step["conv_state_out"], "recurrent_state": step["recurrent_state_out"]}
        np.testing.assert_allclose(full["conv_states"][:, i], st["conv_state"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(full["recurrent_states"][:, i], st["recurrent_state"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("file", ["model.onnx", "model.window.onnx"])
def test_linked_graph_computes_each_size_once(moe_export, tmp_path, file):
    """The blocks each compute the call's sizes from their own tensors, with their own copies of small
    constants; linked, every size is read from one tensor and each constant is kept once, so ONNX
    Runtime's common-subexpression pass leaves one node per size for the whole model (the graphs'
    agreement with the blocks is `test_linked_graph_matches_blocks` and the rollback suites)."""
    import onnxruntime as ort

    man = load_manifest(moe_export)
    first_attention = next(b.name for b in man.chain if b.kind == "full_attention")
    graph = onnx.load(str(moe_export / file), load_external_data=False).graph
    sizes = {(n.input[0], *(a.i for a in n.attribute)) for n in graph.node if n.op_type == "Shape"}
    assert sizes == {("input_ids", 0, 1), ("input_ids", 1, 2), ("attention_mask", 1, 2),
                     (f"{first_attention}.past_key", 0, 1)}
    inline = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    values = {(t.data_type, tuple(t.dims), t.raw_data, tuple(t.int64_data), tuple(t.float_data)) for t in inline}
    assert len(inline) > 20 and len(values) == len(inline)

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(moe_export))
    ort.InferenceSession(str(moe_export / file), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    # (the ONNX functions ONNX Runtime inlines have Shapes of their own, of other tensors)
    sized = {"input_ids", "attention_mask", *(f"{b.name}/hidden_out" for b in man.chain),
             *(f"{b.name}.past_key" for b in man.chain)}
    read = [(n.input[0], *(a.i for a in sorted(n.attribute, key=lambda a: a.name, reverse=True)))
            for n in optimized.node if n.op_type == "Shape" and n.input[0] in sized]
    assert sorted(read) == sorted(sizes)


def test_linked_load_defers_block_sessions(moe_export, tmp_path):
    """With a linked graph, plain decode loads it alone (the blocks' sessions would hold a second copy of
    every weight); a layer-granular step loads the blocks then and agrees; a broken block file still
    fails at load."""
    import shutil

    from dualbrain.errors import DualbrainError
    from dualbrain.runtime.backends.onnxruntime import LINKED

    model = Model.load(moe_export)
    assert list(model.backend.sessions) == [LINKED]
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (2, 5))
    s1, s2 = model.new_state(2), model.new_state(2)
    plain = model.step(ids, s1)
    layered = model.step(ids, s2, hidden_after=[1])
    assert set(model.backend.sessions) == {LINKED, *(b.name for b in model.manifest.chain)}
    np.testing.assert_allclose(plain.logits, layered.logits, rtol=1e-5, atol=1e-5)

    dst = tmp_path / "out"
    shutil.copytree(moe_export, dst)
    graph = dst / "layer_002.onnx"
    raw = bytearray(graph.read_bytes())
    raw[: len(raw) // 2] = b"\xff" * (len(raw) // 2)      # same size: past the manifest's size check
    graph.write_bytes(bytes(raw))
    with pytest.raises(DualbrainError, match="cannot load layer_002"):
        Model.load(dst)


def test_truncated_external_data_caught_at_load(artifacts, tmp_path):
    import shutil

    from dualbrain.errors import DualbrainError

    src = artifacts.export(artifacts.checkpoint("dense", "causal"))
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    data = dst / "layer_001.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(DualbrainError, match="layer_001.onnx.data.*truncated"):
        Model.load(dst)


def test_manifest_refuses_escaping_paths(artifacts, tmp_path):
    import shutil

    from dualbrain.errors import DualbrainError

    src = artifacts.export(artifacts.checkpoint("dense", "causal"))
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    for bad in ("../secret", "/etc/passwd"):
        m = dict(man, files={**man["files"], bad: {"size": 1, "sha256": ""}})
        (dst / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DualbrainError, match="refusing"):
            load_manifest(dst)
