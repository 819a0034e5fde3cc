from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "llama_cpp", "onnxruntime", "onnx", "workers", "validators")


def test_import_api_does_not_import_ml_frameworks_or_workers() -> None:
    code = (
        "import sys, api.main, api.cli, api.lambda_handler\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"api imported: {out.stdout.strip()}"
