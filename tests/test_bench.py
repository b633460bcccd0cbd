"""`tinygpt bench`: what it reports, on a run too short to time anything (timings are BENCHMARKS.md's job)."""
import json
import math

import pytest

from tinygpt import bench
from tinygpt.cli import main


def bench_json(capsys, *argv):
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_training_step_report(capsys):
    r = bench_json(capsys, "--preset", "cpu", "--batch-size", "4", "--steps", "2", "--rounds", "2",
                   "--no-memory", "--workers", "2")
    assert (r["preset"], r["batch_size"], r["block_size"], r["steps"], r["rounds"]) == ("cpu", 4, 64, 2, 2)
    assert r["n_params"] == 804_096                       # the cpu preset's model with a 65-symbol vocabulary
    assert abs(r["first_loss"]["tinygpt"] - math.log(65)) < 0.15
    t = r["tinygpt"]
    assert t["ms_per_step"] > 0 and r["matmul_peak_gflops"] > 0
    assert t["tokens_per_s"] == pytest.approx(4 * 64 / t["ms_per_step"] * 1000, rel=1e-3)
    matmul_weights = 4 * (128 * 384 + 128 * 128 + 2 * 128 * 512) + 128 * 65   # 4 blocks' Linears, lm_head
    flops = 4 * 64 * (6 * matmul_weights + 12 * 4 * 64 * 128)     # per token: 6 per weight, 12·L·T·C attention
    assert t["gflops"] == pytest.approx(flops / t["ms_per_step"] / 1e6, rel=0.02)
    assert t["mfu"] == pytest.approx(t["gflops"] / r["matmul_peak_gflops"], rel=0.02)
    if r["torch"] is not None:                            # PyTorch installed: it ran the same model
        assert r["first_loss"]["torch"] == pytest.approx(r["first_loss"]["tinygpt"], abs=1e-4)
        assert r["speed_ratio_vs_torch"] == pytest.approx(
            r["torch"]["ms_per_step"] / t["ms_per_step"], rel=1e-2)


@pytest.mark.parametrize("seconds", [1.2345e-3, 4.4449e-4, 3.7e-5, 0.123456])
def test_fast_steps_keep_their_digits(capsys, monkeypatch, seconds):
    """A fast machine (or a GPU): steps of a millisecond or less. The derived figures must agree with the
    reported ms_per_step as tightly as on a slow machine (rounding ms to 2 decimals broke this)."""
    monkeypatch.setattr(bench, "_timed", lambda step, n, sync: [seconds] * n)
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda device: 123.4)
    r = bench_json(capsys, "--preset", "cpu", "--batch-size", "2", "--steps", "1", "--rounds", "1", "--no-memory",
                   "--workers", "1")
    t = r["tinygpt"]
    assert t["ms_per_step"] == pytest.approx(seconds * 1000, rel=5e-4)
    assert t["tokens_per_s"] == pytest.approx(2 * 64 / t["ms_per_step"] * 1000, rel=1e-3)
    flops = bench.flops_per_step(bench.model_config("cpu"), 2)
    assert t["gflops"] == pytest.approx(flops / t["ms_per_step"] / 1e6, rel=1e-3)
    assert t["mfu"] == pytest.approx(t["gflops"] / r["matmul_peak_gflops"], rel=5e-3)
    if r["torch"] is not None:
        assert r["speed_ratio_vs_torch"] == pytest.approx(1.0, rel=1e-3)


@pytest.mark.slow
def test_generation_report(capsys):
    r = bench_json(capsys, "--generate", "--rounds", "1")
    assert r["identical_tokens"] is True
    assert r["context"] == 256 and r["rounds"] == 1
    assert r["speedup"] == pytest.approx(r["tokens_per_s_cached"] / r["tokens_per_s_uncached"], rel=1e-2)
    assert r["speedup"] > 1
