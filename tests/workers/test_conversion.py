"""Pickle → safetensors conversion: the tensors it must handle and the sandboxed child."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.workers.conftest import fault_convert_argv, runner_processes
from workers.conversion import converted_path
from workers.runner.convert_child import NotAStateDict, state_dict_of, storable
from workers.runner.converter import ConversionFailed, Converter
from workers.runner.process import Runner, RunnerSetupFailed


def _stage_and_convert(converter: Converter, source: Path) -> Path:
    data = source.read_bytes()
    staged = converter.stage(lambda: source.open("rb"), hashlib.sha256(data).hexdigest(), len(data))
    return converter.convert(staged)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("pytorch_model.bin", "model.safetensors"),
        ("pytorch_model-00001-of-00002.bin", "model-00001-of-00002.safetensors"),
        ("model.pt", "model.safetensors"),
        ("ckpt/weights.pth", "ckpt/weights.safetensors"),
    ],
)
def test_converted_path_uses_the_names_transformers_looks_for(path: str, expected: str) -> None:
    assert converted_path(path) == expected


def test_storable_tied_shared_and_non_contiguous_tensors_round_trip(tmp_path: Path) -> None:
    embed = torch.randn(8, 4)
    buffer = torch.arange(12, dtype=torch.float32)
    state = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: the same tensor under two names
        "first": buffer[:6],  # two views of one storage
        "second": buffer[6:].view(2, 3),
        "transposed": torch.randn(3, 5).t(),  # non-contiguous
    }
    with pytest.raises(RuntimeError):  # what safetensors does without the preparation
        save_file(state, str(tmp_path / "raw.safetensors"))
    out = tmp_path / "ok.safetensors"
    save_file(storable(state), str(out))
    loaded = load_file(str(out))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["lm_head.weight"].untyped_storage().data_ptr() != (
        loaded["embed.weight"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"weights": [1, 2, 3]}, "not a tensor"),
        ({"epoch": 3, "w": torch.ones(1)}, "not a tensor"),
        ({1: torch.ones(1)}, "not a string"),
        ({}, "expected a state dict"),
        ([torch.ones(1)], "expected a state dict"),
        ({"w": torch.ones(2, 2).to_sparse()}, "sparse"),
    ],
)
def test_state_dict_of_refuses_what_is_not_dense_named_tensors(obj: Any, message: str) -> None:
    with pytest.raises(NotAStateDict, match=message):
        state_dict_of(obj)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_state_dict_of_unwraps_training_checkpoints(wrapper: str) -> None:
    inner = {"w": torch.ones(2)}
    assert state_dict_of({wrapper: inner}) is inner


def test_converter_tied_embeddings_bin_converts_in_the_sandbox(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from tests.utils.model_files import llama_config

    config = llama_config()
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    model.tie_weights()
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    source = tmp_path / "pytorch_model.bin"
    torch.save(state, source)
    with Converter(timeout_s=120) as converter:
        produced = _stage_and_convert(converter, source)
        assert produced.parent == converter.sandbox.tmpdir  # written inside the sandbox
        loaded = load_file(str(produced))
    assert set(loaded) == set(state)
    assert torch.equal(loaded["lm_head.weight"], state["model.embed_tokens.weight"])
    assert not converter.sandbox.tmpdir.exists()
    assert not runner_processes()


def test_converter_not_a_state_dict_fails_and_cleans_up(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.save({"weights": [1, 2, 3]}, source)
    with Converter(timeout_s=120) as converter, pytest.raises(ConversionFailed) as info:
        _stage_and_convert(converter, source)
    assert info.value.code == "CONVERSION_FAILED"
    assert "not a tensor" in info.value.message
    assert not converter.sandbox.tmpdir.exists()
    assert not runner_processes()


@pytest.mark.parametrize(
    ("mode", "code", "reason"),
    [
        ("exit", "CONVERSION_FAILED", "exit status 3"),
        ("hang", "CONVERSION_TIMEOUT", "longer than 3s"),
    ],
)
def test_converter_child_that_dies_or_hangs_fails_and_is_killed(
    pytorch_bundle: Path, mode: str, code: str, reason: str
) -> None:
    converter = Converter(timeout_s=3, argv=fault_convert_argv(mode))
    with converter, pytest.raises(ConversionFailed) as info:
        _stage_and_convert(converter, pytorch_bundle / "model.pt")
    assert info.value.code == code and reason in info.value.message
    assert converter.pid is not None and not runner_processes()
    assert not converter.sandbox.tmpdir.exists()


def test_converter_stage_refuses_an_upload_changed_since_validation(
    pytorch_bundle: Path, tmp_path: Path
) -> None:
    source = pytorch_bundle / "model.pt"
    size = source.stat().st_size
    with Converter(timeout_s=60) as converter, pytest.raises(ConversionFailed, match="changed"):
        converter.stage(lambda: source.open("rb"), "0" * 64, size)
    assert converter.pid is None  # no child was started for it


def test_serving_runner_refuses_a_bundle_holding_a_pickle(transformers_bin_bundle: Path) -> None:
    runner = Runner(transformers_bin_bundle, "transformers")
    try:
        with pytest.raises(RunnerSetupFailed, match=r"pytorch_model\.bin is pickle-based"):
            runner.start()
    finally:
        runner.stop()
    assert not runner_processes()


def test_serving_runner_torch_load_tripwire_stops_library_unpickling(
    transformers_bin_bundle: Path,
) -> None:
    # What transformers would call to read a .bin, after the serving child's tripwire.
    code = (
        "from workers.runner.child import forbid_unpickling\n"
        "forbid_unpickling()\n"
        "from transformers.modeling_utils import load_state_dict\n"
        f"load_state_dict({str(transformers_bin_bundle / 'pytorch_model.bin')!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode != 0
    assert "torch.load is disabled in serving runners" in proc.stderr


def test_converter_child_is_confined_like_a_serving_runner(
    pytorch_bundle: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "escaped"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        argv = [*fault_convert_argv("escape"), str(outside), str(port)]
        with (
            Converter(timeout_s=60, argv=argv) as converter,
            pytest.raises(ConversionFailed) as info,
        ):
            _stage_and_convert(converter, pytorch_bundle / "model.pt")
    found, _ = json.JSONDecoder().raw_decode(info.value.message.split("PROBE ", 1)[1])
    assert found["write"].startswith("denied") and not outside.exists()  # Landlock
    assert found["connect"].startswith("denied")  # no network
    assert found["fork"] == "denied:1"  # seccomp: EPERM
    assert not runner_processes()
