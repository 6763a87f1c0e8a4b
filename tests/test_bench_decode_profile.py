"""bench/decode_profile.py: where a decode step's time goes, eager and compiled, on `tiny`.

No timing is asserted: only that each part is measured where it exists (guard checks only in a compiled step, the
w4a8 kernel counted with the matmuls) and that the table has a row per configuration.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def profiler(bench_script):
    return bench_script("decode_profile")


def test_the_workbench_kernels_count_as_matmuls_and_attention_does_not(profiler):
    for name in ("workbench::q4q8_linear", "aten::_weight_int4pack_mm_for_cpu", "aten::_int_mm", "aten::addmm"):
        assert profiler.is_matmul(name), name
    assert not profiler.is_matmul("aten::_scaled_dot_product_flash_attention_for_cpu")


@pytest.mark.slow
def test_eager_and_compiled_steps_are_split(profiler):
    eager = profiler.profile_config("tiny", "fp32", steps=3, rounds=1)
    compiled = profiler.profile_config("tiny", "fp32|w4a8|compile", steps=3, rounds=1)
    for row in (eager, compiled):
        assert row["step_ms"] > 0 and row["matmul_ms"] > 0 and row["other_ops_ms"] > 0 and row["python_ms"] >= 0
    assert eager["guards_ms"] == 0 < compiled["guards_ms"]  # only a compiled call checks guards
    text = profiler.markdown("tiny", [eager, compiled])
    assert "| fp32 + w4a8 + compile |" in text and text.count("\n| ") == 4  # header, rule, two rows
