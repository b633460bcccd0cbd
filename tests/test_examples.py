"""Every script in examples/ runs as a learner would run it (small settings, a generated corpus)."""
import os
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


def test_bigram_example_learns(corpus, tmp_path):
    out = run_example("bigram.py", "--data", corpus, "--max-iters", 300, tmp_path=tmp_path)
    assert "loss" in out.lower()


def test_gpt_example_trains_a_few_steps(corpus, tmp_path):
    out = run_example("gpt_shakespeare.py", "--data", corpus, "--max-iters", 20, tmp_path=tmp_path)
    assert "loss" in out.lower()
