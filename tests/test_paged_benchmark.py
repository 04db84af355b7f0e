"""The paged-attention and KV-memory benchmark scripts run end to end on a CPU."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ at the root

from benchmarks import attention_memory, attention_paged


def test_paged_benchmark_smoke(tmp_path):
    attention_paged.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "attention_paged.json").read_text())
    assert (tmp_path / "attention_paged.png").stat().st_size > 0
    assert saved["copy_bandwidth_bytes_per_s"] > 0 and len(saved["rows"]) == 2
    for row in saved["rows"]:
        assert set(row["gb_per_s"]) == {"paged_split", "paged_one_pass", "naive_gather_sdpa"}
        # Every path computes the same attention (fp32 on a CPU).
        assert max(v for k, v in row.items() if k.startswith("max_abs_diff")) < 1e-4


def test_memory_benchmark_smoke(tmp_path):
    result = attention_memory.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "attention_memory.png").stat().st_size > 0
    by_block = {r["block_size"]: r for r in result["rows"]}
    # Paging wastes at most one partial block per sequence; bigger blocks waste more.
    assert by_block[8]["waste_paged"] < by_block[16]["waste_paged"] < by_block[32]["waste_paged"]
    assert by_block[16]["waste_paged"] < by_block[16]["waste_contiguous_exact"]
    assert by_block[16]["waste_contiguous_exact"] < by_block[16]["waste_contiguous_max_len"]
