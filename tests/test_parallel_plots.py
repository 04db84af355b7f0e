"""The notebooks' figures draw what they say (no processes)."""

from minillm.config import ModelConfig
from minillm.parallel.plots import plot_memory, plot_ring_steps, plot_shards, plot_timeline
from minillm.parallel.schedule import simulate
from minillm.parallel.tensor_model import tensor_parallel_shapes
from minillm.parallel.zero_memory import zero_model_state_bytes


def test_plots_draw_every_element():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1)
    ax = plot_timeline(simulate("1f1b", 2, 3), axes[0], "1f1b")
    assert len(ax.patches) == 2 * 2 * 3 and "bubble 0.250" in ax.get_title()
    shapes = tensor_parallel_shapes(ModelConfig.from_name("llama-2-7b"), 4)
    assert len(plot_shards(shapes, 4, axes[1]).patches) == 7 * 4  # 7 matrices x 4 ranks
    bars = [zero_model_state_bytes(10**9, 4, s) for s in range(4)]
    assert len(plot_memory(bars, ["0", "1", "2", "3"], axes[2]).patches) == 4 * 3
    assert len(plot_ring_steps(3, axes[3]).patches) == 9
    plt.close(fig)
