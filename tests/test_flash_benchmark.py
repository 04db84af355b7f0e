"""The FlashAttention benchmark script runs end to end (tiny sizes, CPU) and writes its files."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ at the root

from benchmarks import attention_flash


def test_flash_benchmark_smoke(tmp_path):
    result = attention_flash.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "attention_flash.json").read_text())
    assert (tmp_path / "attention_flash.png").stat().st_size > 0
    assert saved["environment"]["device"] and saved["rows"] == json.loads(
        json.dumps(result["rows"])
    )
    passes = {(r["direction"], r["causal"]) for r in saved["rows"]}
    assert passes == {("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True)}
    for row in saved["rows"]:
        assert row["tflops"]["triton"] > 0 and row["fraction_of_matmul_peak"] > 0
        assert any(key.startswith("ratio_vs_") for key in row)
