"""Artifact writing: strict JSON, atomic replacement, safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cba.errors import ConfigError
from cba.io import atomic_path, load_tensors, read_json, save_tensors, write_json


def test_write_json_turns_non_finite_numbers_into_null(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"auroc": float("nan"), "ratio": np.float32("inf"), "rows": [1.5, float("-inf")],
                      "scalar": torch.tensor(0.25), "array": np.array([0.5, np.nan])})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard constant {name}"))
    assert strict == {"auroc": None, "ratio": None, "rows": [1.5, None], "scalar": 0.25, "array": [0.5, None]}
    assert read_json(path) == strict


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"acc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("killed mid-write")
    assert read_json(path) == {"acc": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no temporary left behind


def test_save_and_load_tensors_round_trip_and_corrupt_file(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04 a pickle, not weights")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_tensors(tmp_path / "bad.safetensors")


def test_same_tensors_give_the_same_bytes(tmp_path):
    """safetensors orders its header from a hash map; cba's files must not depend on that (DVC hashes them)."""
    import hashlib

    import torch

    from cba.io import load_tensors, save_tensors

    tensors = {"b": torch.arange(6).reshape(2, 3), "a": torch.ones(3), "c": torch.zeros(1, dtype=torch.float64)}
    metadata = {key: str(i) for i, key in enumerate("pqrstuvwxyz")}
    digests = set()
    for i in range(8):
        save_tensors(tmp_path / f"{i}.safetensors", tensors, metadata)
        digests.add(hashlib.md5((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_tensors(tmp_path / "0.safetensors")
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert handle.metadata() == metadata


@pytest.mark.parametrize("meta, fragment", [
    ({"backbone": "convnet", "width": "abc"}, "width in [1, 4096]"),
    ({"backbone": "convnet", "width": "100000000"}, "width in [1, 4096]"),
    ({"backbone": "vit", "width": "4"}, "known backbone"),
    ({"backbone": "convnet", "width": "8"}, "wrong shape"),  # the weights are width 4's
])
def test_hostile_encoder_files_are_one_line(tmp_path, meta, fragment):
    from cba.errors import ConfigError
    from cba.io import save_tensors
    from cba.models import build_backbone
    from cba.models.io import load_encoder

    path = tmp_path / "encoder.safetensors"
    save_tensors(path, build_backbone("convnet", width=4).state_dict(), metadata=meta)
    with pytest.raises(ConfigError) as caught:
        load_encoder(path)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_results_header_names_the_kernels_on_a_cpu_and_the_gpu_on_cuda(monkeypatch):
    from cba.env import KERNEL_OVERRIDES, environment, where_it_ran

    for name in KERNEL_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    env = environment("cpu")
    assert "kernel_overrides" not in env  # a plain run's record is as it always was
    line = where_it_ran(env)
    assert f"(cpu, {torch.backends.cpu.get_cpu_capability()} kernels)" in line
    assert line.startswith(str(env["device_name"])) and f"torch {torch.__version__}" in line
    assert line.endswith(f"{torch.get_num_threads()} threads")
    gpu = {"device": "cuda:0", "gpu": "NVIDIA H200", "device_name": "NVIDIA H200", "torch": "2.13.0",
           "torch_threads": 16, "cpu_capability": "AVX512"}
    assert where_it_ran(gpu) == "NVIDIA H200 (cuda:0), torch 2.13.0, 16 threads"  # the CPU's kernels do not matter there
    from cba.env import results_header

    assert results_header("A table", "bench/x.py --y 1", gpu) == (
        "# A table\n\nCommand: `bench/x.py --y 1`\n\nRun on NVIDIA H200 (cuda:0), torch 2.13.0, 16 threads.\n\n")


def test_kernel_caps_set_for_a_run_are_recorded_and_named_in_its_header(monkeypatch):
    from cba.env import environment, where_it_ran

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    env = environment("cpu")
    assert env["kernel_overrides"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert "kernels forced by ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)" in where_it_ran(env)
