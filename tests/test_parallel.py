"""Data parallelism over CPU processes: the same gradient as one process, shared weights, errors, lifecycle."""
import io
import sys

import numpy as np
import pytest

import tinygpt
from tinygpt import backend, optim
from tinygpt.models import GPT, GPTConfig
from tinygpt.parallel import DataParallel, choose_workers, default_workers
from tinygpt.train import RunSettings, Trainer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="data parallelism forks: Linux only")

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=True)


def model_and_batch(B=5, seed=0, dropout=0.0):
    tinygpt.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG.__dict__, "dropout": dropout}))
    rng = np.random.default_rng(seed)
    x, y = (rng.integers(0, CFG.vocab_size, (B, CFG.block_size)) for _ in range(2))
    return model, x, y


def one_process_grads(model, x, y, scale=1.0):
    model.zero_grad()
    _, loss = model(tinygpt.tensor(x), tinygpt.tensor(y))
    (loss * scale).backward()
    grads = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    return float(loss.item()), grads


@pytest.mark.parametrize("B,workers", [(5, 2), (4, 3), (2, 4)])   # uneven slices; more workers than rows
def test_gradient_and_loss_equal_one_process(B, workers):
    model, x, y = model_and_batch(B)
    ref_loss, ref = one_process_grads(model, x, y, scale=0.5)
    with DataParallel(model, workers) as dp:
        loss = dp.forward_backward(x, y, grad_scale=0.5)
        assert loss.dtype == np.float32
        assert float(loss) == pytest.approx(ref_loss, rel=1e-6)
        for n, p in model.named_parameters():
            np.testing.assert_allclose(p.grad, ref[n], rtol=1e-5, atol=1e-7, err_msg=n)
        dp.forward_backward(x, y, grad_scale=0.5)                        # accumulates, like backward()
        for n, p in model.named_parameters():
            np.testing.assert_allclose(p.grad, 2 * ref[n], rtol=1e-5, atol=1e-7, err_msg=n)


@pytest.mark.parametrize("B,workers", [(5, 2), (2, 3)])
def test_loss_alone_equals_one_process_and_touches_nothing(B, workers):
    model, x, y = model_and_batch(B, dropout=0.5)
    model.eval()                                        # the worker must run in eval mode too (no dropout)
    with tinygpt.no_grad():
        ref = float(model(tinygpt.tensor(x), tinygpt.tensor(y))[1].item())
    with DataParallel(model, workers) as dp:
        rng_state = backend.get_rng_state()
        loss = dp.loss(x, y)
        assert loss.dtype == np.float32
        assert float(loss) == pytest.approx(ref, rel=1e-6)
        assert all(p.grad is None for p in model.parameters())
        assert backend.get_rng_state() == rng_state      # no dropout seeds drawn: training streams unmoved
        with tinygpt.no_grad():                           # as estimate_loss calls it
            assert float(dp.loss(x, y)) == pytest.approx(ref, rel=1e-6)
        ref_loss, ref_grads = one_process_grads(model, x, y)
        assert float(dp.forward_backward(x, y)) == pytest.approx(ref_loss, rel=1e-6)   # training goes on
        np.testing.assert_allclose(model.transformer.wte.weight.grad, ref_grads["transformer.wte.weight"],
                                   rtol=1e-5, atol=1e-7)


def test_optimizer_steps_in_the_main_process_reach_the_workers():
    model, x, y = model_and_batch(6)
    twin, _, _ = model_and_batch(6)
    opt = optim.SGD(model.parameters(), lr=0.5)        # SGD: Adam would blow rounding noise up to lr-sized
    twin_opt = optim.SGD(twin.parameters(), lr=0.5)    # steps (c_attn's key bias has a zero true gradient)
    with DataParallel(model, 2) as dp:
        for _ in range(3):
            opt.zero_grad()
            loss = dp.forward_backward(x, y)
            opt.step()
            twin_opt.zero_grad()
            _, twin_loss = twin(tinygpt.tensor(x), tinygpt.tensor(y))
            twin_loss.backward()
            twin_opt.step()
            assert float(loss) == pytest.approx(float(twin_loss.item()), rel=1e-5)
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-4, atol=1e-6, err_msg=n)
        # a parameter given a new array (not written in place) is shared again before the next step
        w = model.transformer.wpe.weight
        w.data = w.data * 0 + 1
        twin.transformer.wpe.weight.data[...] = 1
        ref_loss, ref = one_process_grads(twin, x, y)
        model.zero_grad()
        assert float(dp.forward_backward(x, y)) == pytest.approx(ref_loss, rel=1e-5)
        np.testing.assert_allclose(w.grad, ref["transformer.wpe.weight"], rtol=1e-4, atol=1e-6)


def test_dropout_is_repeatable_and_differs_between_slices():
    def grads(seed):
        model, x, y = model_and_batch(4, dropout=0.5)
        x[2:], y[2:] = x[:2], y[:2]        # the worker's rows repeat the main's: only dropout tells them apart
        with DataParallel(model, 2) as dp:
            tinygpt.manual_seed(seed)
            dp.forward_backward(x, y)
            both = model.transformer.wte.weight.grad.copy()
            model.zero_grad()               # the main process's half alone, with the same draws: the
            tinygpt.manual_seed(seed)       # worker's seed first, then its own dropout masks
            backend.host_rng().integers(2 ** 62)
            _, loss = model(tinygpt.tensor(x[:2]), tinygpt.tensor(y[:2]))
            loss.backward()
            main_half = model.transformer.wte.weight.grad.copy()
        return both, main_half
    both, main_half = grads(3)
    np.testing.assert_array_equal(grads(3)[0], both)                 # the same seed: the same step
    worker_half = 2 * both - main_half                               # both = ½ main + ½ worker
    assert np.abs(worker_half - main_half).max() > 1e-3               # the worker drew its own masks
    model, x, y = model_and_batch(4, dropout=0.5)
    x[2:], y[2:] = x[:2], y[:2]
    model.eval()                           # no dropout: the two halves give the same gradient
    with DataParallel(model, 2) as dp:
        dp.forward_backward(x[:2], y[:2])
        half = model.transformer.wte.weight.grad.copy()
        model.zero_grad()
        dp.forward_backward(x, y)
    np.testing.assert_allclose(model.transformer.wte.weight.grad, half, rtol=1e-5, atol=1e-7)


def test_worker_error_is_reported_and_the_workers_stay_usable():
    model, x, y = model_and_batch(4)
    with DataParallel(model, 2) as dp:
        bad = y.copy()
        bad[3, 0] = 99                     # out of the vocabulary, in the worker's rows only
        with pytest.raises(RuntimeError, match="worker 1 failed: .*99"):
            dp.forward_backward(x, bad)
        model.zero_grad()
        ref_loss, _ = one_process_grads(model, x, y)
        assert float(dp.forward_backward(x, y)) == pytest.approx(ref_loss, rel=1e-6)
        with pytest.raises(ValueError, match="one \\(B, T\\) shape"):
            dp.forward_backward(x, y[:, :3])


def test_close_gives_back_private_memory_and_stops_the_workers():
    model, x, y = model_and_batch(4)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    dp = DataParallel(model, 2)
    procs = list(dp._procs)
    shared = [p.data for p in model.parameters()]
    dp.close()
    dp.close()                             # twice is fine
    assert all(not proc.is_alive() for proc in procs)
    for p, s in zip(model.parameters(), shared):
        assert p.data is not s and p.data.flags.owndata
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), before[n])
    ref_loss, _ = one_process_grads(model, x, y)
    assert float(dp.forward_backward(x, y)) == pytest.approx(ref_loss, rel=1e-6)   # inline now


def test_bad_use_is_refused():
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        DataParallel(model, 0)
    with tinygpt.no_grad(), pytest.raises(RuntimeError, match="outside"):
        DataParallel(model, 2)


def test_choose_workers_skips_small_models(monkeypatch):
    model, _, _ = model_and_batch()
    assert choose_workers(3, model, 10) == 3                      # asked for: given
    assert choose_workers(0, model, 10) == 1                      # ~1e6 FLOPs a step: not worth a process
    big = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    assert choose_workers(0, big, 12 * 64) == default_workers()   # the cpu preset: ~3.7 GFLOP a step
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")                # one core: no worker processes
    assert choose_workers(0, big, 12 * 64) == 1


def test_trainer_with_workers_tracks_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(np.random.default_rng(0).choice(["ab ", "cd ", "ef\n"], 2000)), encoding="utf-8")
    results = {}
    for workers in (1, 2):
        s = RunSettings.from_preset("cpu", data=str(corpus), out_dir=str(tmp_path / f"w{workers}"), n_layer=1,
                                    n_head=2, n_embd=16, block_size=8, batch_size=6, max_iters=6,
                                    eval_interval=3, eval_iters=2, workers=workers)
        trainer = Trainer(s, progress=False, out=io.StringIO())
        results[workers] = trainer.run()
        assert trainer._parallel is None                          # closed at the end of run()
    for a, b in zip(results[1].history, results[2].history):
        assert a["iter"] == b["iter"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    with pytest.raises(Exception, match="workers must be an integer >= 0"):
        RunSettings.from_preset("cpu", workers=-1)


# --- workers never outlive the main process -----------------------------------------------------------------
_ORPHAN_SCRIPT = r"""
import os, sys, threading, time
import numpy as np
import tinygpt
from tinygpt.models import GPT, GPTConfig
from tinygpt.parallel import DataParallel

mode = sys.argv[1]
model = GPT(GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=8))
x = np.random.default_rng(0).integers(0, 11, (6, 6))
box = {}
if mode == "thread":          # forked from a thread that then ends: no PDEATHSIG, the watchdog alone
    t = threading.Thread(target=lambda: box.update(dp=DataParallel(model, 3)))
    t.start()
    t.join()
else:
    box["dp"] = DataParallel(model, 3)
dp = box["dp"]
dp.forward_backward(x, x)     # the workers work after their forking thread ended
holder = os.fork()            # another process that keeps copies of every pipe end open: no EOF for them
if holder == 0:
    time.sleep(60)
    os._exit(0)
print(" ".join(str(p.pid) for p in dp._procs), holder, flush=True)
time.sleep(60)
"""


def _gone(pid):
    """True once `pid` has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("mode", ["main", "thread"])
def test_workers_exit_when_the_main_process_is_killed(tmp_path, mode):
    """SIGKILL the main process while a third process holds the pipes open (so no EOF reaches the workers):
    PDEATHSIG (forked from the main thread) or the parent-pid watchdog (forked from another thread) ends
    every worker within a few seconds, and a DataParallel made in a thread that ended still works."""
    import os
    import signal
    import subprocess
    import time
    p = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, mode], stdout=subprocess.PIPE, text=True)
    try:
        *workers, holder = map(int, p.stdout.readline().split())
        assert len(workers) == 2 and not any(_gone(w) for w in workers)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        deadline = time.time() + 5
        while time.time() < deadline and not all(_gone(w) for w in workers):
            time.sleep(0.05)
        survivors = [w for w in workers if not _gone(w)]
        assert not survivors, f"workers {survivors} outlived the main process"
        assert not _gone(holder)                          # the holder (not a worker) was left alone
    finally:
        for pid in locals().get("workers", []) + [locals().get("holder")]:
            if pid and not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        p.kill()


def test_workers_ignore_the_signals_the_main_process_handles():
    """SIGINT, SIGTERM, SIGHUP to a worker (a terminal or `kill -TERM -PGID` sends them to every process)
    leave it running: the main process saves first, then closes it."""
    import os
    import signal
    import time
    model, x, y = model_and_batch(4)
    ref_loss, _ = one_process_grads(model, x, y)
    with DataParallel(model, 2) as dp:
        dp.forward_backward(x, y)
        model.zero_grad()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(dp._procs[0].pid, sig)
        time.sleep(0.2)
        assert dp._procs[0].is_alive()
        assert float(dp.forward_backward(x, y)) == pytest.approx(ref_loss, rel=1e-6)
