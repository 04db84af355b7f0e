"""Benchmark plumbing: timing and the result files."""

import json

from minillm.bench import environment, save_result, time_fn


def test_time_fn_measures_the_call():
    import time

    seconds = time_fn(lambda: time.sleep(0.01), warmup=1, repeat=3, device="cpu")
    assert 0.009 < seconds < 0.1


def test_save_result_writes_environment(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([1, 2])
    path = save_result("demo", {"ratio": 2.0}, fig, out_dir=tmp_path)
    data = json.loads(path.read_text())
    assert data["ratio"] == 2.0 and data["environment"]["torch"] == environment()["torch"]
    assert "device" in data["environment"]
    assert (tmp_path / "demo.png").stat().st_size > 0
