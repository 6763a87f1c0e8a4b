"""bench/matmul_kernels.py: the matrices a decode step multiplies by, and one pass of every kernel over small ones.

No timing is asserted: only that every kernel runs on the shapes and the table is filled.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def kernels(bench_script):
    return bench_script("matmul_kernels")


def test_a_decode_step_reads_every_block_matrix_and_the_head(kernels):
    from workbench.models.loader import count_params

    shapes = kernels.step_shapes("preset:llama-124m")
    assert len(shapes) == 12 * 7 + 1 and shapes[-1] == (50257, 768)
    assert shapes[:7] == [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
    config = kernels.PRESETS["llama-124m"].make_config()
    norms = (2 * config.num_hidden_layers + 1) * config.hidden_size
    assert sum(o * i for o, i in shapes) == count_params(config) - norms  # tied: the head is the embedding
    with pytest.raises(SystemExit, match="not a Llama-style preset"):
        kernels.step_shapes("preset:gpt2-124m")
    with pytest.raises(SystemExit, match="unknown preset"):
        kernels.step_shapes("preset:nope")


def test_every_kernel_runs_and_fills_its_row(kernels, tmp_path):
    shapes = [(64, 128), (40, 64)]  # 40 rows: w4a16 pads them to 48
    rows = kernels.measure(shapes, rounds=1)
    assert [r["kernel"] for r in rows] == list(kernels.KERNELS)
    assert all(r["ms_per_step"] > 0 and r["gweights_per_s"] > 0 for r in rows)
    assert rows[0]["speedup_vs_fp32"] == pytest.approx(1.0)
    text = kernels.markdown({"model": "m", "threads": 1, "rounds": 1, "cpu": "c", "torch": "t", "matrices": 2,
                             "weights": 10560, "rows": rows})
    assert text.count("\n| ") == len(rows) + 2  # the header, the rule and a row per kernel
