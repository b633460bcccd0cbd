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


def test_plain_loop_report(capsys, monkeypatch):
    """--plain: the learner's loop in this process (DataParallel is never made), on the lecture's model."""
    def no_data_parallel(*a, **k):
        raise AssertionError("--plain must not use DataParallel")
    monkeypatch.setattr(bench, "DataParallel", no_data_parallel)
    r = bench_json(capsys, "--plain", "--batch-size", "4", "--steps", "2", "--rounds", "2", "--no-memory")
    assert r["mode"] == "plain" and r["threads"].isdigit()
    config = bench.plain_config("cpu")
    assert (config.activation, config.bias, config.tie_weights) == ("relu", True, False)
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (4, 4, 128, 64)
    untied = 804_096 + 65 * 128 + 65                        # + lm_head's own weight and bias
    biases = 4 * (384 + 128 + 512 + 128 + 2 * 128) + 128    # the blocks' Linear and LayerNorm biases, ln_f
    assert r["n_params"] == untied + biases
    assert abs(r["first_loss"]["tinygpt"] - math.log(65)) < 0.15
    if r["torch"] is not None:
        assert r["first_loss"]["torch"] == pytest.approx(r["first_loss"]["tinygpt"], abs=1e-4)
        q = r["round_ratios"]
        assert q["min"] <= q["median"] <= q["max"]


def test_round_ratios_are_per_round(capsys, monkeypatch):
    """Each round's ratio is torch's median step over tinygpt's in that round; the report gives their spread."""
    times = iter([[0.010] * 2, [0.020] * 2, [0.030] * 2, [0.030] * 2, [0.010] * 2, [0.040] * 2])
    monkeypatch.setattr(bench, "_timed", lambda step, n, sync: next(times))
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda device: 100.0)
    r = bench_json(capsys, "--plain", "--batch-size", "2", "--steps", "6", "--rounds", "3", "--no-memory")
    if r["torch"] is None:
        pytest.skip("torch is not installed")
    # round 1: tinygpt 10 ms then torch 20 ms; round 2 (torch first): torch 30, tinygpt 30; round 3: 10, 40
    assert r["round_ratios"] == {"median": 2.0, "min": 1.0, "max": 4.0}
    assert r["tinygpt"]["ms_per_step"] == pytest.approx(10.0)       # median of 10, 10, 30, 30, 10, 10
    assert r["torch"]["ms_per_step"] == pytest.approx(30.0)         # median of 20, 20, 30, 30, 40, 40
    assert r["speed_ratio_vs_torch"] == pytest.approx(3.0)


def test_op_overhead_report(capsys):
    r = bench_json(capsys, "--op-overhead", "--rounds", "2")
    assert r["mode"] == "op-overhead" and r["rounds"] == 2
    for name in ("numpy_forward", "tinygpt_forward", "tinygpt_forward_backward"):
        s = r[f"{name}_us"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
    med = {k[:-3]: v["median"] for k, v in r.items() if k.endswith("_us")}
    assert r["time_ratio_forward_vs_numpy"] == pytest.approx(med["tinygpt_forward"] / med["numpy_forward"], rel=6e-3)
    if r["torch"] is not None:
        assert r["time_ratio_forward_backward_vs_torch"] == pytest.approx(
            med["tinygpt_forward_backward"] / med["torch_forward_backward"], rel=6e-3)
        assert r["time_ratio_forward_vs_torch"] == pytest.approx(
            med["tinygpt_forward"] / med["torch_forward"], rel=6e-3)
