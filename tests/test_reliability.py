"""Issue 15, reliability: resources that run out, files that lie, numbers that blow up, processes that die.

Each test names what it guards; the training-loop ones run a tiny GPT on a small corpus for a few steps.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tinygpt import tokenizers
from tinygpt.tokenizers import BPETokenizer, TokenizerError


# ---- a BPE tokenizer file cannot hang the encoder ----------------------------------------------------------

CATASTROPHIC = [r"(?:a+)+b", r"(?:a|aa)*c", r"(?:\w+\s?)+$", r"\s*x", r"a?" * 30 + "a" * 30, r"(?:ab|cd)+"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_bpe_file_with_a_backtracking_pattern_is_refused_at_load(tmp_path, pattern):
    """The first three take seconds to centuries on ~30 characters of the wrong text with Python's re; the
    loader refuses them (and their milder kin) in one line, before any text is encoded."""
    d = BPETokenizer([(97, 97)]).to_dict()
    d["pattern"] = pattern
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match="backtrack") as e:
        tokenizers.load(path)
    assert time.perf_counter() - t0 < 0.5 and "\n" not in str(e.value)


@pytest.mark.parametrize("pattern", [tokenizers.SPLIT_PATTERN, r"\w+|\s+|[^\w\s]+", r" ?\w+| ?\d+|\s+|.",
                                     r"(?i)'(?:s|t|re)| ?[a-z]+|[^a-z]"])
def test_linear_patterns_still_load_and_round_trip(tmp_path, pattern):
    text = "The cat's 12 hats, ok?\n\n  end"
    tok = BPETokenizer.train(text * 5, 270, pattern=pattern)
    loaded = tokenizers.load(tok.save(tmp_path / "tok.json"))
    assert loaded.pattern == pattern and loaded.decode(loaded.encode(text)) == text
    assert loaded.encode(text) == tok.encode(text)


def test_accepted_patterns_encode_adversarial_text_in_linear_time():
    """What the check promises, measured: 8x the text costs about 8x the time (a backtracking pattern
    would cost 64x or more), on runs of the characters that repeats and optional pieces compete for."""
    tok = BPETokenizer([], pattern=r" ?a?b?\w+| ?\d+|\s+|.")
    def cost(n):
        text = ("a" * n + " " * n + "ab" * n + "!" * n + "a " * n)
        tok._cache.clear()
        t0 = time.perf_counter()
        tok.encode(text)
        return time.perf_counter() - t0
    cost(2000)
    small, big = min(cost(20000) for _ in range(3)), min(cost(160000) for _ in range(3))
    assert big < 20 * small, (small, big)


# ---- the Python API refuses what it cannot compute --------------------------------------------------------

@pytest.mark.parametrize("targets,ignore_index", [([0, 2, -1], -1), ([0, -2, 1], -1), ([0, 3, 1], -1),
                                                  ([0, 3, 1], 3), ([0, -100, 1], -100), ([0, -1, 1], -100),
                                                  ([7, 7, 7], 7)])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_cross_entropy_rejects_exactly_the_targets_torch_rejects(targets, ignore_index):
    """torch is the oracle: a target outside [0, V) that is not ignore_index is an error there too."""
    torch = pytest.importorskip("torch")
    import tinygpt.functional as F
    import tinygpt
    logits = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    try:
        want = float(torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets),
                                                       ignore_index=ignore_index))
    except (IndexError, RuntimeError):
        want = None
    if want is None:
        with pytest.raises(IndexError, match="out of range for 3 classes") as e:
            F.cross_entropy(tinygpt.tensor(logits), tinygpt.tensor(targets), ignore_index=ignore_index)
        assert "\n" not in str(e.value)
    else:
        got = F.cross_entropy(tinygpt.tensor(logits), tinygpt.tensor(targets), ignore_index=ignore_index)
        assert np.isnan(want) and np.isnan(got.item()) or got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("max_norm", [float("inf"), float("nan"), -1.0, "1.0", None])
def test_clip_grad_norm_rejects_a_max_norm_that_is_not_a_finite_number(max_norm):
    import tinygpt
    from tinygpt import optim
    p = tinygpt.tensor(np.ones(3, np.float32), requires_grad=True)
    p.grad = np.array([3.0, 4.0, 0.0], np.float32)
    with pytest.raises(ValueError, match="max_norm must be a finite number >= 0"):
        optim.clip_grad_norm_([p], max_norm)
    np.testing.assert_array_equal(p.grad, [3.0, 4.0, 0.0])                # untouched
    assert float(optim.clip_grad_norm_([p], 0.0).item()) == 5.0 and not p.grad.any()   # 0 is allowed


@pytest.mark.parametrize("edit,match", [
    (lambda sd: {"model." + k: v for k, v in sd.items()}, "extra prefix 'model.'"),
    (lambda sd: {**sd, "weight": None}, "'weight' is None, not numbers; pass an array of float32 with shape"),
    (lambda sd: {**sd, "weight": [[1.0, 2.0], [3.0]]}, "'weight' is a list that is not an array"),
    (lambda sd: {**sd, "weight": np.array([["a", "b"]] * 3)}, "'weight' is a ndarray of <U1 values, not num"),
    (lambda sd: {0: 1}, "keys must be parameter names"),
    (lambda sd: {**sd, "weight": sd["weight"].T}, r"'weight' has shape \(2, 3\) .* parameter has shape \(3, 2\)"),
    (lambda sd: {**{f"w{i}": 0 for i in range(9)}, **sd}, r"unexpected keys \['w0', 'w1', 'w2', 'w3'\] and 5 more"),
])
def test_load_state_dict_says_what_is_wrong_and_writes_nothing(edit, match):
    from tinygpt import nn
    m = nn.Linear(2, 3)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    bad = edit({k: np.zeros_like(v) for k, v in m.state_dict().items()})
    with pytest.raises(nn.StateDictError, match=match) as e:
        m.load_state_dict(bad)
    assert "\n" not in str(e.value)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# ---- the training loop: helpers ------------------------------------------------------------------------------
import io
import signal
from pathlib import Path

from tinygpt import checkpoint, memory, models, rundir
from tinygpt.cli import main
from tinygpt.settings import make_optimizer
from tinygpt.train import RunSettings, Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=4, eval_iters=2)
TINY_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
              "--eval-iters", "2"]


@pytest.fixture
def corpus(corpus, tmp_path, monkeypatch):
    """conftest's corpus, with the token cache in tmp_path."""
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    return corpus


def trainer(corpus, out_dir, **kw):
    return Trainer(RunSettings.from_preset("cpu", **{**TINY, **kw}, data=str(corpus), out_dir=str(out_dir)),
                   progress=False, out=io.StringIO())


def strict_rows(out_dir):
    """log.jsonl parsed by a strict JSON reader: bare NaN or Infinity would raise."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return [json.loads(line, parse_constant=refuse) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def one_line(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- 1. a full disk ------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the requested size (root only; skip otherwise), unmounted afterwards."""
    mounted = []

    def make(size_bytes):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        kib = -(-size_bytes // 4096) * 4
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d
    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(corpus, tmp_path, small_disk,
                                                                              capsys):
    """A disk with room for two checkpoints and not a third: the save at the second evaluation fails. The
    run ends with one line and status 2, the checkpoints of iteration 0 load, no temp file is left, and
    the log is whole."""
    probe = tmp_path / "probe"
    assert main(["train", "--data", str(corpus), "--out-dir", str(probe), "--max-iters", "0", *TINY_FLAGS]) == 0
    size = (probe / checkpoint.LAST).stat().st_size
    disk = small_disk(2 * size + 20_000)
    out = disk / "run"
    capsys.readouterr()
    rc = main(["train", "--data", str(corpus), "--out-dir", str(out), "--max-iters", "20", "--eval-interval", "5",
               *TINY_FLAGS])
    assert rc == 2
    one_line(capsys.readouterr().err, "No space left on device", "unchanged", "--resume")
    assert checkpoint.load(out / checkpoint.LAST).iter == 0 and checkpoint.load(out / checkpoint.BEST).iter == 0
    assert sorted(os.listdir(out)) == ["ckpt_best.safetensors", "ckpt_last.safetensors", "log.jsonl"]
    assert [r["iter"] for r in strict_rows(out)] == [0]


# ---- 1. memory: estimated before allocating ----------------------------------------------------------------
def test_parameter_count_is_the_built_models():
    import itertools
    for V, C, L, bias, qkv, tie, norm, rope in itertools.product(
            [11, 65], [16, 48], [1, 3], [True, False], [None, True, False], [True, False],
            ["layernorm", "rmsnorm"], [False, True]):
        cfg = dict(model="gpt", vocab_size=V, block_size=8, n_layer=L, n_head=4, n_embd=C, bias=bias,
                   qkv_bias=qkv, tie_weights=tie, norm=norm, rope=rope, qk_norm=rope, activation="relu2")
        assert memory.parameter_count(cfg) == models.model_from_config(cfg).num_parameters(), cfg
    assert memory.parameter_count({"model": "bigram", "vocab_size": 7}) == 49


@pytest.mark.parametrize("cfg,B,T,opt", [
    (dict(model="gpt", vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False), 12, 64, "adamw"),
    (dict(model="gpt", vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False), 12, 64, "muon"),
    (dict(model="gpt", vocab_size=65, block_size=128, n_layer=2, n_head=8, n_embd=32), 4, 128, "adamw"),
    (dict(model="gpt", vocab_size=65, block_size=8, n_layer=1, n_head=8, n_embd=384), 2, 8, "adamw"),
    (dict(model="gpt", vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=256, bias=False, norm="rmsnorm",
          rope=True, qk_norm=True, activation="relu2"), 8, 32, "muon"),
    (dict(model="bigram", vocab_size=300), 32, 64, "adamw")])
def test_training_bytes_is_a_lower_bound_of_the_measured_peak(cfg, B, T, opt):
    """tracemalloc sees every NumPy allocation: the peak of building the model and AdamW and running two
    steps is at least the estimate (so a refused run could never have fit), and at most ~2.5x it; with
    AdamW, and with Muon (one momentum buffer on the blocks' matrices, AdamW on the rest)."""
    import tracemalloc

    import tinygpt
    from tinygpt import optim
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, cfg["vocab_size"], (B, T)) for _ in range(2))
    tracemalloc.start()
    try:
        m = models.model_from_config(cfg)
        o = make_optimizer(RunSettings(optimizer=opt), m) if cfg["model"] == "gpt" else \
            optim.AdamW(optim.weight_decay_groups(m, 0.1), lr=1e-3)
        for _ in range(2):
            m(tinygpt.tensor(x), tinygpt.tensor(y))[1].backward()
            o.step()
            o.zero_grad()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    est = memory.training_bytes(cfg, B, T, optimizer=opt)["total"]
    assert est <= peak <= 2.5 * est, (est, peak)


def test_a_run_that_cannot_fit_is_refused_before_allocating(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1_000_000)            # 1 MB free
    monkeypatch.setattr(models, "model_from_config", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs at least .* GiB .* only 0\.00 GiB") as e:
        trainer(corpus, tmp_path / "o", batch_size=64)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()             # nothing left behind


def test_an_absurd_model_exits_2_in_one_line_on_this_machine(corpus, tmp_path, capsys):
    """64 layers of 16384 channels: ~2e11 parameters, 3 TB of weights and AdamW state (real free memory)."""
    t0 = time.perf_counter()
    rc = main(["train", "--data", str(corpus), "--out-dir", str(tmp_path / "o"), "--n-layer", "64", "--n-head",
               "16", "--n-embd", "16384", "--block-size", "8", "--batch-size", "4", "--max-iters", "1"])
    assert rc == 2 and time.perf_counter() - t0 < 10
    one_line(capsys.readouterr().err, "needs at least", "parameters")
    assert not (tmp_path / "o").exists()


def test_check_fits_counts_workers_and_only_the_host_copy_on_a_gpu():
    cfg = dict(model="gpt", vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    one, four = (memory.training_bytes(cfg, 12, 64, w)["total"] for w in (1, 4))
    assert four - one == 3 * 4 * memory.parameter_count(cfg)
    memory.check_fits(cfg, 12, 64, 1, "cpu", available=one)
    with pytest.raises(memory.InsufficientMemoryError):
        memory.check_fits(cfg, 12, 64, 4, "cpu", available=one)
    memory.check_fits(cfg, 12, 64, 1, "cuda", available=4 * memory.parameter_count(cfg))


# ---- 4. numbers are finite -----------------------------------------------------------------------------------
def poison_at(monkeypatch, it, how="weights"):
    """After the step that ends at iteration `it`, a weight (or, during it, a gradient) becomes nan."""
    real_step, real_clip = Trainer.train_step, __import__("tinygpt").optim.clip_grad_norm_

    def step(self):
        out = real_step(self)
        if how == "weights" and self.iter == it:
            self.model.transformer.wte.weight.data[0, 0] = np.nan
        return out
    monkeypatch.setattr(Trainer, "train_step", step)
    if how == "grad":
        import tinygpt.optim as optim_mod

        def clip(params, max_norm):
            params = list(params)
            if params[0].grad is not None and clip.calls == it:
                params[0].grad[0, 0] = np.inf
            clip.calls += 1
            return real_clip(params, max_norm)
        clip.calls = 0
        monkeypatch.setattr(optim_mod, "clip_grad_norm_", clip)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("where", ["eval", "train_step", "grad_norm"])
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, where):
    """eval: the weights turn nan in the step that ends at iteration 4, the evaluation at 4 sees it;
    train_step: the same at 3, and the step of iteration 3 sees it in its loss (before its update);
    grad_norm: an infinite gradient in the step of iteration 3. In each, nothing after the last good
    checkpoint is saved."""
    interval = 2 if where == "eval" else 100
    if where == "grad_norm":
        poison_at(monkeypatch, 3, how="grad")
    else:
        poison_at(monkeypatch, 4 if where == "eval" else 3)
    t = trainer(corpus, tmp_path / "o", max_iters=10, eval_interval=interval)
    with pytest.raises(TrainingDiverged) as e:
        t.run()
    msg = str(e.value)
    assert "\n" not in msg and "stopped without saving" in msg and "last good checkpoint" in msg
    good = 2 if where == "eval" else 0
    assert f"(iteration {good})" in msg
    last = checkpoint.load(tmp_path / "o" / checkpoint.LAST)
    assert last.iter == good and all(np.isfinite(v).all() for v in last.model_state.values())
    rows = strict_rows(tmp_path / "o")
    if where == "eval":
        assert [r["iter"] for r in rows] == [0, 2, 4] and rows[-1]["val_loss"] == "nan"
        assert "evaluation loss is nan" in msg
    else:
        assert [r["iter"] for r in rows] == [0]
        assert ("training loss is nan at iteration 3" if where == "train_step" else "gradient norm is") in msg
        if where == "grad_norm":                  # stopped before the update: the weights never took it
            assert all(np.isfinite(p.numpy()).all() for p in t.model.parameters())


def test_a_nan_is_one_line_and_exit_2_from_the_command_line(corpus, tmp_path, monkeypatch, capsys):
    poison_at(monkeypatch, 4)
    rc = main(["train", "--data", str(corpus), "--out-dir", str(tmp_path / "o"), "--max-iters", "10",
               "--eval-interval", "2", *TINY_FLAGS])
    assert rc == 2
    one_line(capsys.readouterr().err, "nan", "ckpt_last.safetensors (iteration 2) is the last good checkpoint")


def test_nan_weights_are_never_saved(corpus, tmp_path):
    t = trainer(corpus, tmp_path / "o", max_iters=2, eval_interval=2)
    t.run()
    before = (tmp_path / "o" / checkpoint.LAST).read_bytes()
    t.model.transformer.wpe.weight.data[1, 1] = np.inf
    with pytest.raises(TrainingDiverged, match="the weights hold nan or inf"):
        t.save("last")
    assert (tmp_path / "o" / checkpoint.LAST).read_bytes() == before


def test_strict_json_writes_non_finite_numbers_as_strings():
    rec = {"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": {"d": None}}
    assert rundir.strict_json(rec) == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": {"d": None}}
    assert [float(v) for v in rundir.strict_json(rec)["b"][:2]] == [float("inf"), -float("inf")]


# ---- 6. one writer per out-dir; a kill loses no log line -------------------------------------------------------
_HOLD_LOCK = r"""
import os, sys, time
from tinygpt import rundir
lock = rundir.OutDirLock(sys.argv[1]).acquire()
child = 0
if sys.argv[2] == "fork":          # a child that outlives us must not keep the out-dir locked
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(30)
"""


def hold_lock(out_dir, mode="hold"):
    p = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out_dir), mode], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    pid, p.child = map(int, p.stdout.readline().split())
    assert pid == p.pid
    return p


def test_busy_out_dir_is_refused_and_a_rejected_resume_touches_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--max-iters", "4", "--eval-interval", "2",
                 *TINY_FLAGS]) == 0
    with open(out / "log.jsonl", "a") as f:                 # a line from after the checkpoint (a killed run)
        f.write(json.dumps({"iter": 99, "train_loss": 1.0, "val_loss": 1.0}) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = hold_lock(out)
    try:
        capsys.readouterr()
        for args in (["--resume", "--max-iters", "6"], ["--max-iters", "6"]):
            assert main(["train", "--data", str(corpus), "--out-dir", str(out), *args, *TINY_FLAGS]) == 2
            one_line(capsys.readouterr().err, "is in use by another tinygpt train", f"(pid {holder.pid})")
        assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--resume", "--n-layer", "3"]) == 2
        one_line(capsys.readouterr().err, "in use")
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--resume", "--n-layer", "3"]) == 2
    one_line(capsys.readouterr().err, "cannot change n_layer")           # rejected after taking the lock
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != rundir.LOCK_NAME}
    assert after == {k: v for k, v in before.items() if k != rundir.LOCK_NAME}      # log.jsonl not truncated
    assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--resume", "--max-iters", "6"]) == 0
    assert [r["iter"] for r in strict_rows(out)] == [0, 2, 4, 6]           # the resumed run drops line 99


def test_a_trainer_holds_the_out_dir_until_it_runs_or_closes(corpus, tmp_path):
    a = trainer(corpus, tmp_path / "o", max_iters=2, eval_interval=2)
    with pytest.raises(rundir.OutDirBusyError, match="in use"):
        trainer(corpus, tmp_path / "o", max_iters=2)
    a.close()
    b = trainer(corpus, tmp_path / "o", max_iters=2, eval_interval=2)
    b.run()
    with pytest.raises(checkpoint.CheckpointError, match="already holds a checkpoint"):
        trainer(corpus, tmp_path / "o", max_iters=2)
    assert set(os.listdir(tmp_path / "o")) - {"loss.png"} == {"ckpt_best.safetensors", "ckpt_last.safetensors",
                                                             "log.jsonl"}      # no lock file left


def test_a_forked_child_does_not_keep_the_lock_when_its_parent_is_killed(tmp_path):
    holder = hold_lock(tmp_path / "o", "fork")
    with pytest.raises(rundir.OutDirBusyError):
        rundir.OutDirLock(tmp_path / "o").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    deadline = time.time() + 3                     # the child drops its copy as soon as it first runs
    while True:
        try:
            lock = rundir.OutDirLock(tmp_path / "o").acquire()   # its child still sleeps: the lock is free
            break
        except rundir.OutDirBusyError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
    lock.release()
    assert not _gone(holder.child)                 # the child was alive all along
    os.kill(holder.child, signal.SIGKILL)


def test_concurrent_fresh_runs_into_one_out_dir_one_wins(corpus, tmp_path):
    """No check-then-write race: three runs started at once into one new out-dir; exactly one trains, the
    others exit 2 in one line (busy, or a checkpoint already there)."""
    cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(corpus), "--out-dir", str(tmp_path / "o"),
           "--max-iters", "30", "--eval-interval", "10", "--no-progress", *TINY_FLAGS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2, 2], results
    for rc, err in results:
        if rc == 2:
            assert err.count("\n") == 1 and ("in use" in err or "already holds a checkpoint" in err), err
    assert [r["iter"] for r in strict_rows(tmp_path / "o")] == [0, 10, 20, 30]


class Killed(BaseException):
    """A stand-in for SIGKILL at one exact point (BaseException: nothing catches it on the way out)."""


def test_a_kill_between_the_checkpoint_and_its_log_line_loses_no_line(corpus, tmp_path, monkeypatch):
    full = trainer(corpus, tmp_path / "full", max_iters=6, eval_interval=2)
    full.run()
    real = rundir.append_log

    def killed_at_4(path, record):
        if record["iter"] == 4:
            raise Killed()
        real(path, record)
    monkeypatch.setattr(rundir, "append_log", killed_at_4)
    with pytest.raises(Killed):
        trainer(corpus, tmp_path / "part", max_iters=6, eval_interval=2).run()
    assert checkpoint.load(tmp_path / "part" / checkpoint.LAST).iter == 4
    assert [r["iter"] for r in strict_rows(tmp_path / "part")] == [0, 2]        # line 4 was lost
    monkeypatch.setattr(rundir, "append_log", real)
    Trainer.resume(tmp_path / "part", {"max_iters": 6}, progress=False, out=io.StringIO()).run()
    keys = ("iter", "train_loss", "val_loss", "lr", "best_val_loss")
    assert [[r[k] for k in keys] for r in strict_rows(tmp_path / "part")] == \
           [[r[k] for k in keys] for r in strict_rows(tmp_path / "full")]     # line 4 is back, exactly


def test_temp_files_of_killed_saves_are_removed_at_the_next_start(corpus, tmp_path):
    trainer(corpus, tmp_path / "o", max_iters=2, eval_interval=2).run()
    left = [".ckpt_last.safetensors.k1ll3d.tmp", ".ckpt_best.safetensors.x.tmp", "log.jsonl.tmp",
            ".loss.png.tmp.png"]
    for name in left:
        (tmp_path / "o" / name).write_bytes(b"half a file")
    (tmp_path / "o" / "notes.txt").write_text("mine")
    Trainer.resume(tmp_path / "o", {"max_iters": 4}, progress=False, out=io.StringIO()).run()
    names = set(os.listdir(tmp_path / "o"))
    assert not names & set(left) and "notes.txt" in names


# ---- 5. kills: no worker survives, SIGTERM and SIGHUP save ------------------------------------------------------
def _children(pid):
    """The child pids of every thread of `pid` (a thread that ends while we look has none left)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return kids


def _gone(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="data-parallel workers fork: Linux only")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGHUP"])
def test_killing_the_trainer_leaves_no_worker_and_resume_continues(corpus, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(corpus), "--out-dir", str(out),
           "--max-iters", "1000000", "--eval-interval", "5", "--workers", "3", "--no-progress", *TINY_FLAGS]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(tmp_path / "err.txt", "w") as err_file:            # a file: a surviving worker cannot block it
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, text=True, env=env)
    workers = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "log.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.3)
        workers = _children(p.pid)
        assert len(workers) == 2, workers                   # --workers 3: two forked processes
        p.send_signal(getattr(signal, sig))
        rc = p.wait(timeout=60)
        err = (tmp_path / "err.txt").read_text()
        deadline = time.time() + 5
        while time.time() < deadline and not all(_gone(w) for w in workers):
            time.sleep(0.05)
        assert [w for w in workers if not _gone(w)] == [], "a worker outlived the trainer"
    finally:
        for w in workers:
            if not _gone(w):
                os.kill(w, signal.SIGKILL)
        p.kill()
    if sig == "SIGKILL":
        assert rc == -signal.SIGKILL
    else:                                                    # saved first, like Ctrl-C: 128 + the signal
        assert rc == 128 + getattr(signal, sig), err
        assert "Traceback" not in err and f"interrupted by {sig}" in err and "--resume" in err
    saved = checkpoint.load(out / checkpoint.LAST).iter
    r = subprocess.run(cmd[:cmd.index("--max-iters")] + ["--resume", "--max-iters", str(saved + 5), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr                       # the lock died with the trainer
    assert checkpoint.load(out / checkpoint.LAST).iter == saved + 5
    iters = [row["iter"] for row in strict_rows(out)]
    assert iters == sorted(set(iters)) and iters[-1] == saved + 5
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---- 1. a checkpoint whose header claims a far larger run ---------------------------------------------------
def test_resume_from_a_header_claiming_a_huge_model_builds_nothing(corpus, tmp_path, monkeypatch):
    """The run settings inside the header (digest recomputed, as a forger would) say 65536 channels; the
    tensors say 16. Resume refuses in one line before any model is built."""
    import struct

    from safetensors.numpy import load_file
    trainer(corpus, tmp_path / "o", max_iters=2, eval_interval=2).run()
    path = tmp_path / "o" / checkpoint.LAST
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["tinygpt"])
    meta["settings"].update(n_embd=1 << 16, n_head=2)
    meta["sha256"] = checkpoint._digest(load_file(str(path)), meta)
    header["__metadata__"]["tinygpt"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    monkeypatch.setattr(models, "model_from_config", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"does not add up: .*wte.weight has shape \(\d+, 65536\).*\(\d+, 16\)") as e:
        Trainer.resume(tmp_path / "o", progress=False, out=io.StringIO())
    assert "\n" not in str(e.value)


def test_a_log_or_plot_that_cannot_be_written_is_handled(corpus, tmp_path, monkeypatch):
    """The plot is derived: failing to draw it (a full disk) never fails a finished run, and leaves no temp
    file. Rewriting the log on resume on a full disk keeps the old log and leaves no half copy."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    def full(self, fname, *a, **k):
        Path(fname).write_bytes(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    r = trainer(corpus, tmp_path / "o", max_iters=2, eval_interval=2).run()
    assert r.iter == 2 and not (tmp_path / "o" / "loss.png").exists()
    assert not [n for n in os.listdir(tmp_path / "o") if "tmp" in n]
    log = tmp_path / "o" / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"iter": 50}) + "\n")
    before = log.read_bytes()

    def no_space(self, text, *a, **k):                 # writes a few bytes, then the disk is full
        with open(self, "w") as f:
            f.write(text[:3])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError):
        rundir.prepare_log(log, 2)
    monkeypatch.undo()
    assert log.read_bytes() == before and not (tmp_path / "o" / "log.jsonl.tmp").exists()


def test_a_tokenizer_that_does_not_match_the_model_is_refused_by_sample_and_resume(corpus, tmp_path, capsys):
    import struct

    from safetensors.numpy import load_file
    out = tmp_path / "o"
    assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--max-iters", "2", "--eval-interval",
                 "2", *TINY_FLAGS]) == 0
    for name in (checkpoint.LAST, checkpoint.BEST):          # one character fewer, digest recomputed
        path = out / name
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        meta = json.loads(header["__metadata__"]["tinygpt"])
        meta["tokenizer"]["chars"] = meta["tokenizer"]["chars"][:-1]
        meta["sha256"] = checkpoint._digest(load_file(str(path)), meta)
        header["__metadata__"]["tinygpt"] = json.dumps(meta)
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    capsys.readouterr()
    assert main(["sample", "--out-dir", str(out), "--max-new-tokens", "5"]) == 2
    one_line(capsys.readouterr().err, "tokenizer of 13 tokens with a model whose embedding has 14 rows")
    assert main(["train", "--out-dir", str(out), "--resume", "--max-iters", "4"]) == 2
    one_line(capsys.readouterr().err, "tokenizer of 13 tokens with a model whose embedding has 14 rows")
