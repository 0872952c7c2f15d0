"""Hostile inputs, crash-safe artifacts, and one model shared by many threads."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dualbrain.errors import DualbrainError
from dualbrain.runtime.spec import ModelSpec
from dualbrain.runtime.manifest import file_digest, load_manifest

pytest.importorskip("torch")


# ---- untrusted external data -----------------------------------------------------------------------
@pytest.fixture()
def export_copy(artifacts, tmp_path) -> Path:
    src = artifacts.export(artifacts.checkpoint("dense", "causal", tie=True))
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    return dst


def _point_external_data(out: Path, block: str, location: str) -> None:
    import onnx

    path = out / f"{block}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in t.external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, str(path))
    man = json.loads((out / "manifest.json").read_text())
    man["files"][path.name] = file_digest(path)   # an attacker would fix the manifest too
    (out / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("location", ["../escape.data", "/etc/passwd", "link.data"])
def test_external_data_escaping_model_dir(export_copy, tmp_path, location):
    from dualbrain.runtime.model import Model

    (tmp_path / "escape.data").write_bytes(b"\0" * 4096)
    if location == "link.data":
        os.symlink(tmp_path / "escape.data", export_copy / "link.data")
    _point_external_data(export_copy, "layer_000", location)
    with pytest.raises(DualbrainError, match="refusing"):
        Model.load(export_copy)


def test_hash_verification_on_request(export_copy):
    from dualbrain.runtime.model import Model

    data = export_copy / "layer_002.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF                       # same size, different content
    data.write_bytes(bytes(raw))
    Model.load(export_copy)                # sizes match: loads
    with pytest.raises(DualbrainError, match="sha256"):
        Model.load(export_copy, verify_hashes=True)


# ---- crash safety ------------------------------------------------------------------------------------
def test_too_little_disk_space(artifacts, tmp_path, monkeypatch):
    import dualbrain.exporter.export as export_mod

    ckpt = artifacts.checkpoint("dense", "causal", tie=True)
    real = shutil.disk_usage

    def tiny_disk(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(export_mod.shutil, "disk_usage", tiny_disk)
    out = tmp_path / "out"
    with pytest.raises(DualbrainError, match="not enough disk space"):
        export_mod.export_checkpoint(ckpt, out)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_ctrl_c_mid_export_then_resume(artifacts, tmp_path):
    ckpt = artifacts.checkpoint("moe", "causal", "per_expert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier, complete export")
    part = tmp_path / "out.partial"
    cmd = [sys.executable, "-m", "dualbrain.cli", "export", str(ckpt), "-o", str(out)]
    # SIGINT back to its default in the child: a test run started in the background by a shell without job
    # control ignores SIGINT, the child would inherit that, and Python would then never see Ctrl-C
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    journal = part / ".journal.json"
    deadline = time.time() + 300
    while time.time() < deadline:   # wait until at least two blocks are finished
        if journal.is_file() and len(json.loads(journal.read_text() or "{}").get("done", {})) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail(f"export ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert (out / "previous.txt").read_text() == "an earlier, complete export"
    assert not (out / "manifest.json").exists()
    assert part.is_dir()
    done_before = set(json.loads(journal.read_text())["done"])
    assert len(done_before) >= 2

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resumed out.partial: reused" in res.stderr
    assert not part.exists() and not (out / "previous.txt").exists()
    man = load_manifest(out, verify_hashes=True)
    assert len(man.blocks) == 6 and not (out / ".journal.json").exists()


def test_resume_ignores_blocks_that_no_longer_match(artifacts, tmp_path):
    """A finished block whose file was damaged after the interruption is exported again."""
    from dualbrain.artifacts import Journal
    from dualbrain.exporter.export import export_checkpoint

    ckpt = artifacts.checkpoint("dense", "causal", tie=True)
    out = tmp_path / "out"
    export_checkpoint(ckpt, out, linked=False)
    # fake an interrupted run: the finished export becomes a partial one with a journal
    part = tmp_path / "out.partial"
    os.replace(out, part)
    from dualbrain.exporter.export import _resume_key
    from dualbrain.exporter.checkpoint import Checkpoint

    key = _resume_key(ckpt, Checkpoint(ckpt), "float32", 512)
    j = Journal(part, key)
    for name in ("embed", "layer_000"):
        j.record(name, {f: file_digest(part / f) for f in (f"{name}.onnx", f"{name}.onnx.data")})
    (part / "layer_000.onnx.data").write_bytes(b"damaged")
    logs = []
    export_checkpoint(ckpt, out, linked=False, log=logs.append)
    assert logs == ["resumed out.partial: reused 1 finished block(s) whose sha256 still matched"]
    load_manifest(out, verify_hashes=True)


# ---- concurrency -------------------------------------------------------------------------------------
def test_eight_threads_match_sequential(artifacts):
    from dualbrain.runtime.backends.onnxruntime import LINKED
    from dualbrain.runtime.generate import generate
    from dualbrain.runtime.model import Model
    from dualbrain.runtime.sampling import SamplingParams

    model = Model.load(artifacts.export(artifacts.checkpoint("moe", "conditional")))
    rng = np.random.default_rng(0)
    jobs = [(rng.integers(0, model.vocab_size, int(n)).tolist(),
             SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=i, max_new_tokens=24) if i % 2
             else SamplingParams(greedy=True, max_new_tokens=24))
            for i, n in enumerate(rng.integers(1, 40, 8))]
    sequential = [generate(model, [p], sp)[0].new_ids for p, sp in jobs]
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        results[i] = generate(model, [jobs[i][0]], jobs[i][1])[0].new_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == sequential
    # one session per graph, shared: threads did not copy it
    assert list(model.backend.sessions) == [LINKED]      # plain decode loads the linked graph alone


# ---- fuzzing: any input loads or raises the user-facing error ------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)


def _valid_config() -> dict:
    from dualbrain.exporter.tiny import text_config_dict

    return dict(text_config_dict(family="moe"), model_type="qwen3_5_moe_text")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.dictionaries(st.sampled_from(sorted(_valid_config()) + ["text_config", "model_type"]),
                                 json_values, max_size=4))
def test_fuzz_config_parser(mutations):
    cfg = {**_valid_config(), **mutations}
    try:
        ModelSpec.from_config(cfg)
    except DualbrainError:
        pass


@settings(max_examples=150, deadline=None)
@given(doc=json_values)
def test_fuzz_config_parser_any_json(doc):
    try:
        ModelSpec.from_config(doc)
    except DualbrainError:
        pass


@pytest.fixture(scope="module")
def manifest_template(artifacts):
    out = artifacts.export(artifacts.checkpoint("dense", "causal", tie=True))
    return out, json.loads((out / "manifest.json").read_text())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["format", "version", "model", "dtype", "opset", "max_context", "window", "blocks",
                            "files", "tokenizer_files", "linked"]),
       value=json_values, block_field=st.sampled_from(["name", "kind", "file", "inputs", "outputs", "layer", "state"]),
       where=st.sampled_from(["top", "block"]))
def test_fuzz_manifest_parser(manifest_template, tmp_path_factory, key, value, block_field, where):
    out, template = manifest_template
    doc = json.loads(json.dumps(template))
    if where == "top":
        doc[key] = value
    else:
        doc["blocks"][1][block_field] = value
    d = tmp_path_factory.mktemp("m")
    for f in out.iterdir():
        if f.name != "manifest.json":
            os.symlink(f, d / f.name)
    (d / "manifest.json").write_text(json.dumps(doc))
    try:
        load_manifest(d)
    except DualbrainError:
        pass


@settings(max_examples=300, deadline=None)
@given(mutations=st.dictionaries(st.text(max_size=16) | st.sampled_from(
           ["name", "target", "flavour", "compute_capabilities", "precision", "linked", "timing_cache",
            "optimization_level", "workspace_mib", "profile"]), json_values, max_size=4),
       profile=st.dictionaries(st.sampled_from(["min_batch", "opt_batch", "max_batch", "opt_prefill", "max_prefill",
                                                "opt_context", "max_context", "decode_profile", "bogus"]),
                               json_values, max_size=3))
def test_fuzz_recipe_parser(mutations, profile):
    import tomllib

    import dualbrain.recipes
    from dualbrain.recipes.schema import parse_recipe

    base = tomllib.loads((Path(dualbrain.recipes.__file__).parent / "rtx4090-fp16.toml").read_text())
    doc = {**base, **mutations}
    if isinstance(doc.get("profile"), dict):
        doc["profile"] = {**doc["profile"], **profile}
    try:
        parse_recipe(doc, "fuzz.toml")
    except DualbrainError:
        pass
