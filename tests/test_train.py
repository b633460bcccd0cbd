"""The training loop: exact resume, schedule, accumulation, logs, and the bigram optimum on a Markov chain."""
import io
import json
import math
import sys

import numpy as np
import pytest

from tinygpt import checkpoint, optim
from tinygpt.models import ConfigError
from tinygpt.train import RunSettings, Trainer

TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=4, eval_iters=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))


def run(corpus, out_dir, resume=False, **kw):
    settings = dict(TINY, data=str(corpus), out_dir=str(out_dir), **kw)
    if resume:
        trainer = Trainer.resume(out_dir, {k: v for k, v in kw.items()}, progress=False, out=io.StringIO())
    else:
        trainer = Trainer(RunSettings.from_preset("cpu", **settings), progress=False, out=io.StringIO())
    trainer.run()
    return trainer


def log_lines(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="data parallelism forks: Linux only"))])
def test_resume_is_bit_identical_to_an_uninterrupted_run(corpus, tmp_path, workers):
    common = dict(dropout=0.1, grad_accum=2, eval_interval=4, warmup_iters=3, lr_decay_iters=12,
                  workers=workers)
    full = run(corpus, tmp_path / "full", max_iters=12, **common)
    part = run(corpus, tmp_path / "part", max_iters=6, **common)          # stops at 6 (not an eval step)
    assert part.iter == 6
    resumed = run(corpus, tmp_path / "part", resume=True, max_iters=12)
    assert resumed.iter == 12
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert np.array_equal(a.numpy(), b.numpy()), n
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert sa[i]["step"] == sb[i]["step"] == 12
        assert np.array_equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    a = {r["iter"]: (r["train_loss"], r["val_loss"], r["lr"]) for r in log_lines(tmp_path / "full")}
    b = {r["iter"]: (r["train_loss"], r["val_loss"], r["lr"]) for r in log_lines(tmp_path / "part")}
    assert sorted(a) == [0, 4, 8, 12] and sorted(b) == [0, 4, 6, 8, 12]
    for it in a:
        assert a[it] == b[it], it                                        # exactly the same floats
    ck_full = checkpoint.load(tmp_path / "full" / checkpoint.LAST)
    ck_part = checkpoint.load(tmp_path / "part" / checkpoint.LAST)
    assert ck_full.meta["rng"] == ck_part.meta["rng"]


def test_resume_cannot_change_the_run_and_fresh_run_cannot_overwrite(corpus, tmp_path):
    run(corpus, tmp_path / "o", max_iters=2, eval_interval=2)
    ckpt = tmp_path / "o" / checkpoint.LAST
    before = ckpt.read_bytes()
    with pytest.raises(ConfigError, match="cannot change n_layer"):
        Trainer.resume(tmp_path / "o", {"n_layer": 3})
    with pytest.raises(checkpoint.CheckpointError, match="--resume"):
        Trainer(RunSettings.from_preset("cpu", **TINY, data=str(corpus), out_dir=str(tmp_path / "o")))
    with pytest.raises(checkpoint.CheckpointError, match="nothing to resume"):
        Trainer.resume(tmp_path / "empty")
    assert ckpt.read_bytes() == before


def test_schedule_comes_from_the_preset_not_from_max_iters(corpus, tmp_path):
    t = run(corpus, tmp_path / "o", max_iters=9, eval_interval=3)       # the cpu preset: warmup 100, decay 2000
    ref = optim.WarmupCosineLR(1e-3, 100, 2000, 1e-4)
    assert [r["lr"] for r in log_lines(tmp_path / "o")] == [ref(i) for i in (0, 3, 6, 9)]
    assert t.optimizer.param_groups[0]["lr"] == ref(8)                  # the last step ran at it = 8
    assert t.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert t.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_log_lines_and_checkpoints(corpus, tmp_path):
    out = io.StringIO()
    t = Trainer(RunSettings.from_preset("cpu", **TINY, data=str(corpus), out_dir=str(tmp_path / "o"),
                                        max_iters=4, eval_interval=2), progress=False, out=out)
    result = t.run()
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("step 0: train loss ") and ", val loss " in printed[0]
    assert len(printed) == 3
    rows = log_lines(tmp_path / "o")
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert rows[0]["tokens_per_s"] is None and rows[1]["tokens_per_s"] > 0
    assert result.val_loss == rows[-1]["val_loss"]
    best = checkpoint.load(tmp_path / "o" / checkpoint.BEST)
    assert best.meta["best_val_loss"] == min(r["val_loss"] for r in rows)
    assert checkpoint.load(tmp_path / "o" / checkpoint.LAST).iter == 4


def test_grad_accumulation_equals_one_bigger_batch(corpus, tmp_path):
    """Two micro-batches of 4 (mean of means) = one batch of 8 (the batch generator draws the same starts)."""
    a = Trainer(RunSettings.from_preset("cpu", **{**TINY, "batch_size": 4}, grad_accum=2, data=str(corpus),
                                        out_dir=str(tmp_path / "a"), max_iters=1), progress=False)
    b = Trainer(RunSettings.from_preset("cpu", **{**TINY, "batch_size": 8}, data=str(corpus),
                                        out_dir=str(tmp_path / "b"), max_iters=1), progress=False)
    a.train_step()
    b.train_step()
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-5, atol=1e-7, err_msg=n)


def test_bigram_preset_reaches_the_entropy_of_a_markov_chain(tmp_path):
    """Text from a known first-order Markov chain: the best possible bigram loss is its conditional entropy."""
    rng = np.random.default_rng(0)
    V = 6
    P = rng.dirichlet(np.full(V, 0.5), size=V)                  # P[i, j] = p(next = j | current = i)
    chars = "abcdef"
    seq = [0]
    u = rng.random(60000)
    for k in range(60000):
        seq.append(min(int(np.searchsorted(np.cumsum(P[seq[-1]]), u[k])), V - 1))
    (tmp_path / "chain.txt").write_text("".join(chars[i] for i in seq), encoding="utf-8")
    counts = np.bincount(seq[:-1], minlength=V) / len(seq[:-1])  # empirical stationary distribution
    entropy = -(counts[:, None] * P * np.log(P)).sum()
    t = Trainer(RunSettings.from_preset("bigram", data=str(tmp_path / "chain.txt"), out_dir=str(tmp_path / "o"),
                                        max_iters=600, eval_interval=600), progress=False, out=io.StringIO())
    r = t.run()
    assert abs(r.val_loss - entropy) < 0.05, (r.val_loss, entropy)
    assert log_lines(tmp_path / "o")[0]["val_loss"] == pytest.approx(math.log(V), abs=0.02)


@pytest.mark.slow
def test_cpu_preset_on_tiny_shakespeare(tmp_path):
    """nanoGPT's CPU run. nanoGPT itself ends at val 1.886-1.915 depending on the machine (its README rounds
    to 1.88); this preset ends at 1.895-1.923 over seeds 1-4 and 1337, and a PyTorch run from the same init
    and batches matches it to 4 decimals (BENCHMARKS.md). So the bound is the spread, not the README's 1.88."""
    t = Trainer(RunSettings.from_preset("cpu", data="shakespeare", out_dir=str(tmp_path / "o")), progress=False)
    r = t.run()
    rows = log_lines(tmp_path / "o")
    assert r.iter == 2000
    assert abs(rows[0]["val_loss"] - math.log(65)) < 0.1            # step 0: about ln 65
    assert r.val_loss < 1.93
