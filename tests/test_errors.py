"""Bad input gives a one-line error naming the problem, exit code 2, no traceback, and no OUT."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dualbrain.cli import main

pytest.importorskip("torch")


def run_cli(*args: str):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def assert_user_error(args, needle: str, out: Path | None = None):
    code, text = run_cli(*args)
    assert code == 2, text
    assert "Traceback" not in text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert needle.lower() in lines[0].lower(), text
    if out is not None:
        assert not out.exists(), "a failed command left OUT behind"
        assert not out.with_name(out.name + ".partial").exists(), "a failed command left OUT.partial behind"


@pytest.fixture()
def ckpt(artifacts, tmp_path) -> Path:
    src = artifacts.checkpoint("dense", "causal")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, fn):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_path(tmp_path):
    assert_user_error(["export", tmp_path / "nope", "-o", tmp_path / "out"], "does not exist", tmp_path / "out")


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "config.json", tmp_path / "out")


def test_invalid_config(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{ not json")
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "invalid config.json", tmp_path / "out")


def test_unknown_model_type(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "unknown model_type 'llama'", tmp_path / "out")


def test_truncated_safetensors(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "truncated", tmp_path / "out")


def test_truncated_safetensors_header(ckpt, tmp_path):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])          # the 8-byte length survives, the JSON header does not
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "exceeds file size", tmp_path / "out")


def test_header_offset_past_end_of_file(ckpt, tmp_path):
    """A well-formed header whose last tensor points past the end of the data."""
    import struct

    f = ckpt / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start + 1024, end + 1024]
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "past the data size", tmp_path / "out")


def test_missing_safetensors(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "no safetensors", tmp_path / "out")


def test_missing_shard(artifacts, tmp_path):
    src = artifacts.checkpoint("dense", "conditional", shards=2)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    next(dst.glob("model-*.safetensors")).unlink()
    assert_user_error(["export", dst, "-o", tmp_path / "out"], "missing safetensors file", tmp_path / "out")


def test_pickle_checkpoint(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "pickle", tmp_path / "out")


def test_missing_tensor(ckpt, tmp_path):
    _rewrite(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.linear_attn.in_proj_z.weight"))
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "model.layers.1.linear_attn.in_proj_z.weight",
                      tmp_path / "out")


def test_wrong_tensor_shape(ckpt, tmp_path):
    def shrink(t):
        t["model.layers.3.self_attn.o_proj.weight"] = t["model.layers.3.self_attn.o_proj.weight"][:, :-1].contiguous()
    _rewrite(ckpt / "model.safetensors", shrink)
    assert_user_error(["export", ckpt, "-o", tmp_path / "out"], "has shape", tmp_path / "out")


def test_failed_export_keeps_previous_out(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (ckpt / "config.json").write_text("[]")
    code, text = run_cli("export", ckpt, "-o", out)
    assert code == 2 and (out / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def exported(artifacts):
    return artifacts.export(artifacts.checkpoint("dense", "causal", tie=True))


def test_ids_outside_vocab(exported):
    assert_user_error(["generate", exported, "--ids", "1,2,99999", "--greedy"], "outside the vocabulary")


def test_negative_id(exported):
    assert_user_error(["generate", exported, "--ids", "1,-3", "--greedy"], "outside the vocabulary")


def test_prompt_longer_than_context(exported):
    ids = ",".join(["5"] * 600)  # the tiny export's max context is 512
    assert_user_error(["generate", exported, "--ids", ids, "--greedy"], "maximum context")


def test_invalid_sampling(exported):
    assert_user_error(["generate", exported, "--ids", "1,2", "--temperature", "-1"], "temperature")
    assert_user_error(["generate", exported, "--ids", "1,2", "--top-p", "1.5"], "top_p")


def test_not_an_export(tmp_path):
    assert_user_error(["generate", tmp_path, "--ids", "1"], "manifest.json")


def test_no_traceback_in_a_real_process(tmp_path):
    """The installed entry point, as a user runs it."""
    res = subprocess.run([sys.executable, "-m", "dualbrain.cli", "export", str(tmp_path / "missing"), "-o",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: checkpoint path does not exist")
    assert "Traceback" not in res.stderr + res.stdout
