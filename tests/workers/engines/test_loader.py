"""Loading: format and device choice, catchable load failures, hostile embedded templates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import model_files
from tests.utils.stack import ROOT
from tests.workers.engines.conftest import run
from workers.engines import llama
from workers.engines.base import EngineError, GenerateRequest
from workers.engines.loader import load_engine

HOSTILE = "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"


GENERATE_Q8 = """
import sys
from workers.engines.base import GenerateRequest, SamplingParams
from workers.engines.loader import load_engine
engine = load_engine(sys.argv[1], "gguf", device="cpu", threads=2)
params = SamplingParams(max_tokens=8, temperature=0.0, top_k=1, top_p=1.0, seed=7)
stream = engine.generate(GenerateRequest(prompt="The quick brown fox", params=params), lambda: False)
pieces = list(stream)
print("tokens", len(pieces), flush=True)
"""


def test_load_engine_gguf_q8_0_generates_in_a_fresh_process(gguf_model_q8: Path) -> None:
    """Q8_0 matrices picked ggml's AMX buffers on AMX hosts and crashed at the first decode
    (SIGSEGV); a fresh process, so such a crash fails this test instead of the session."""
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE_Q8, str(gguf_model_q8)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "tokens 8"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8 avx512_fp16", True),
        ("fpu sse avx2 avx512f avx512vnni", False),
        ("fpu sse avx2 amx_tile", False),  # tiles without the int8 kernels ggml uses
    ],
)
def test_host_has_amx_reads_the_int8_flag(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert llama.host_has_amx(cpuinfo) is expected


def test_host_has_amx_unreadable_cpuinfo_is_false(tmp_path: Path) -> None:
    assert llama.host_has_amx(tmp_path / "absent") is False


def test_avoid_extra_buffers_turns_them_off_for_every_later_load() -> None:
    code = (
        "from llama_cpp import llama as L\n"
        "from workers.engines.llama import avoid_extra_buffers\n"
        "print(L.llama_cpp.llama_model_default_params().use_extra_bufts)\n"
        "avoid_extra_buffers(); avoid_extra_buffers()\n"
        "print(L.llama_cpp.llama_model_default_params().use_extra_bufts)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "False"]


def test_load_engine_unknown_format_raises(transformers_bundle: Path) -> None:
    with pytest.raises(EngineError, match="unknown model format"):
        load_engine(transformers_bundle, "tflite")


def test_load_engine_unknown_device_raises(transformers_bundle: Path) -> None:
    with pytest.raises(EngineError, match="unknown device"):
        load_engine(transformers_bundle, "transformers", device="tpu")


def test_load_engine_gguf_missing_file_raises(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_text("not a gguf at all")  # the name alone does not count
    with pytest.raises(EngineError, match="no gguf file"):
        load_engine(tmp_path, "gguf")


@pytest.mark.parametrize("keep", [100, 2000, 20000])
def test_load_engine_truncated_gguf_raises_with_llama_log(
    gguf_model: Path, tmp_path: Path, keep: int
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf_model.read_bytes()[:keep])
    with pytest.raises(EngineError) as info:
        load_engine(broken, "gguf")
    message = str(info.value)
    assert message.startswith("llama.cpp could not load the model: ")
    assert "failed to read" in message or "not within the file bounds" in message
    assert str(tmp_path) not in message


def test_load_engine_gguf_bad_version_names_the_version(gguf_model: Path, tmp_path: Path) -> None:
    data = bytearray(gguf_model.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    (tmp_path / "v99.gguf").write_bytes(data)
    with pytest.raises(EngineError, match="version 99"):
        load_engine(tmp_path, "gguf")


@pytest.mark.parametrize(
    ("fixture", "fmt", "pickle_name"),
    [
        ("pytorch_bundle", "pytorch", "model.pt"),
        ("transformers_bin_bundle", "transformers", "pytorch_model.bin"),
        # A pickle beside the converted weights, under a name that does not say so.
        ("pytorch_served_bundle", "pytorch", "notes.txt"),
    ],
)
def test_load_engine_bundle_with_pickle_is_refused_before_loading(
    request: pytest.FixtureRequest, tmp_path: Path, fixture: str, fmt: str, pickle_name: str
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(fixture), bundle)
    if pickle_name == "notes.txt":
        shutil.copy(request.getfixturevalue("pytorch_bundle") / "model.pt", bundle / pickle_name)
    with pytest.raises(EngineError, match="pickle-based weights") as info:
        load_engine(bundle, fmt)
    assert pickle_name in str(info.value)


def test_load_engine_pytorch_without_converted_weights_raises(
    pytorch_served_bundle: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(pytorch_served_bundle, bundle)
    (bundle / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="no safetensors file"):
        load_engine(bundle, "pytorch")


def test_render_gguf_hostile_template_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(model_files, "CHAT_TEMPLATE", HOSTILE)
    path = model_files.make_gguf(tmp_path / "hostile.gguf")
    engine = load_engine(path, "gguf", device="cpu")
    assert engine.has_chat_template
    with pytest.raises(EngineError) as info:
        engine.count_prompt_tokens(GenerateRequest("hi", raw=False))
    assert info.value.code == "CHAT_TEMPLATE_UNSAFE"
    assert not (tmp_path / "MARKER").exists()
    assert run(engine, max_tokens=2)[1].completion_tokens == 2  # raw prompts still work
    engine.close()  # type: ignore[attr-defined]


def test_render_tokenizer_hostile_template_fails_cleanly(
    transformers_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bundle = tmp_path / "bundle"
    shutil.copytree(transformers_bundle, bundle)
    config_path = bundle / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HOSTILE
    config_path.write_text(json.dumps(config))
    engine = load_engine(bundle, "transformers", device="cpu")
    with pytest.raises(EngineError) as info:
        run(engine, raw=False, max_tokens=2)
    assert info.value.code == "CHAT_TEMPLATE_UNSAFE"
    assert not (tmp_path / "MARKER").exists()
