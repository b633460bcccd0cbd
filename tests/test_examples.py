"""Every script in examples/ runs as a learner would run it (small settings, a generated corpus)."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path):
    """A small made-up play, long enough for the cpu preset's 64-token blocks."""
    lines = [f"{who}: {what}\n" for who, what in [("ALICE", "The night is young and so are we."),
                                                   ("BOB", "Speak softly, for the walls have ears!"),
                                                   ("ALICE", "What ears? I hear nothing, good sir.")]]
    path = tmp_path / "play.txt"
    path.write_text("".join(lines) * 60, encoding="utf-8")
    return path


def run_example(name, *args, tmp_path):
    env = {**os.environ, "TINYGPT_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_batch_walkthrough_prints_32_pairs(corpus, tmp_path):
    out = run_example("batch_walkthrough.py", "--corpus", corpus, tmp_path=tmp_path)
    assert sum("the target" in line for line in out.splitlines()) == 32


def test_train_bpe_reports_compression(corpus, tmp_path):
    out = run_example("train_bpe.py", "--corpus", corpus, "--vocab-size", 300, tmp_path=tmp_path)
    assert "compression" in out.lower() or "bytes per token" in out.lower()


def assert_learned(out, vocab_pattern):
    """The printed val losses start near ln V (a uniform guess over the V tokens) and end below both the
    first one and ln V - 0.5: the script learned something."""
    vocab = int(re.search(vocab_pattern, out).group(1))
    val = [float(v) for v in re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", out, re.M)]
    assert len(val) >= 2, out[-2000:]
    assert abs(val[0] - math.log(vocab)) < 0.3, (val, vocab)
    assert val[-1] < val[0] and val[-1] < math.log(vocab) - 0.5, (val, vocab)


def test_bigram_example_learns(corpus, tmp_path):
    out = run_example("bigram.py", "--data", corpus, "--max-iters", 300, tmp_path=tmp_path)
    assert_learned(out, r"vocab_size = (\d+)")                 # 36 symbols: ln 36 = 3.58 -> about 1.47


def test_gpt_example_trains_a_few_steps(corpus, tmp_path):
    out = run_example("gpt_shakespeare.py", "--data", corpus, "--max-iters", 20, tmp_path=tmp_path)
    assert_learned(out, r"vocab (\d+)")                         # 3.66 -> about 2.61 in 20 warmup steps


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_graph_writes_dot_and_svg(tmp_path):
    from tinygpt import viz
    out = run_example("draw_graph.py", "--out", tmp_path / "g", tmp_path=tmp_path)
    assert "L = -8.0; dL/da = 6.0" in out
    dot = (tmp_path / "g" / "expression.dot").read_text()
    assert "e = Mul" in dot and "grad 6.0000" in dot
    assert "transformer.wte.weight, lm_head.weight" in (tmp_path / "g" / "gpt_loss.dot").read_text()
    if viz.available_renderer("svg"):
        assert "<svg" in (tmp_path / "g" / "gpt_loss.svg").read_text()


def test_attention_map_draws_a_png(corpus, tmp_path):
    out = run_example("attention_map.py", "--data", corpus, "--steps", 20, "--prompt", "ALICE: The night",
                      "--out", tmp_path / "a", tmp_path=tmp_path)
    assert out.count("looks most at") == 4                         # one line per head of the last layer
    if _has("matplotlib"):
        assert _is_png(tmp_path / "a" / "attention_map.png")


def test_activation_stats_plots_two_snapshots(corpus, tmp_path):
    out = run_example("activation_stats.py", "--data", corpus, "--steps", 2, "--out", tmp_path / "s",
                      tmp_path=tmp_path)
    assert "--- initialisation" in out and "--- after 2 steps" in out
    assert out.count("(GELU)") == 8                                # 4 layers, 2 snapshots
    if _has("matplotlib"):
        assert _is_png(tmp_path / "s" / "activation_stats.png")
