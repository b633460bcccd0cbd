"""Issue 14: data parallelism under `mpiexec` (tinygpt/distributed.py), against one process as the truth.

The MPI runs go through tests/mpi_scenarios.py (or the CLI) in `mpiexec -n N` subprocesses; what they
write is compared here with the same model, batch and optimizer run in this process without
tinygpt.distributed. They skip where mpi4py or mpiexec is missing (pip install "tinygpt[mpi]").
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

import tinygpt
from tinygpt import backend, checkpoint, distributed, optim

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import mpi_scenarios as sc  # noqa: E402

# the mpiexec next to this Python first: MPICH's wheel puts it in the scripts folder, which a version manager's
# shims (pyenv) may not cover until they are rehashed
_SEARCH = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
MPIEXEC = shutil.which("mpiexec", path=_SEARCH)


def _have_mpi4py() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("mpi4py") is not None
    except (ImportError, ValueError):
        return False


needs_mpi = pytest.mark.skipif(not (_have_mpi4py() and MPIEXEC),
                               reason="needs mpi4py and mpiexec: pip install \"tinygpt[mpi]\"")


def _launcher_flags() -> list:
    """Open MPI's mpiexec wants --oversubscribe for more ranks than cores (MPICH's does not)."""
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    return ["--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "OMPI_", "SLURM_", "MV2_", "MPI_LOCAL"))}
    env.update(TINYGPT_CACHE=str(tmp_path / "cache"), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               TINYGPT_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
               **extra)
    return env


def run(cmd, tmp_path, timeout=90, **env):
    """Run cmd (in its own session, killed whole on timeout); (returncode, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(tmp_path, **env), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout} s; stderr: {err[-2000:]}")
    return proc.returncode, out, err, time.monotonic() - t0


def mpiexec(n, *args):
    return [MPIEXEC, *_launcher_flags(), "-n", str(n), *args]


def scenario(n, name, out, *args):
    return mpiexec(n, sys.executable, str(HERE / "mpi_scenarios.py"), name, str(out), *map(str, args))


def tinygpt_cmd(*args):
    return [sys.executable, "-m", "tinygpt", *args]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def pids(out: Path) -> list:
    return [int(p.read_text()) for p in sorted(out.glob("pid*"))]


def ranks_json(out: Path, n: int) -> list:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


# --- without MPI ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,expected", [
    ({}, False), ({"PMI_SIZE": "2", "PMI_RANK": "0"}, True), ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}, True), ({"PMIX_RANK": "2"}, True),
    ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "0"}, True),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, False),       # an sbatch script itself, not an srun task
    ({"PMI_SIZE": "x"}, False),
])
def test_launched_reads_the_launchers_environment(env, expected):
    assert distributed.launched(env) is expected


def test_collective_timeout_default_and_bad_values():
    assert distributed.collective_timeout({}) == 600
    assert distributed.collective_timeout({distributed.TIMEOUT_ENV: " 2.5 "}) == 2.5
    for bad in ("0", "-1", "soon", "inf", "nan"):
        with pytest.raises(distributed.DistributedError, match=distributed.TIMEOUT_ENV) as e:
            distributed.collective_timeout({distributed.TIMEOUT_ENV: bad})
        assert "\n" not in str(e.value)


def test_one_process_imports_no_mpi(tmp_path, corpus):
    code = ("import sys; from tinygpt.cli import main; rc = main(sys.argv[1:]); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; "
            "from tinygpt import distributed; w = distributed.init(); "
            "assert (w.rank, w.world_size, w.local_rank, w.is_main, w.comm) == (0, 1, 0, True, None); sys.exit(rc)")
    rc, out, err, _ = run([sys.executable, "-c", code, "train", "--data", str(corpus), "--n-layer", "1",
                           "--n-embd", "8", "--n-head", "2", "--block-size", "8", "--batch-size", "2",
                           "--max-iters", "2", "--eval-iters", "1", "--out-dir", str(tmp_path / "o"),
                           "--no-progress"], tmp_path)
    assert rc == 0, err
    assert "ranks" not in out


@pytest.mark.skipif(backend.is_cuda_available(), reason="checks the message given without CuPy or a GPU")
def test_the_nccl_runtime_without_a_gpu_is_one_line():
    from tinygpt.cuda.nccl import Runtime
    with pytest.raises(backend.DeviceError) as e:
        Runtime()
    assert "\n" not in str(e.value) and "cuda" in str(e.value)


# --- the numbers: 2 (and 3) ranks against one process ---------------------------------------------------------
def one_process(B):
    """The truth: the batch's gradient, 10 SGD steps and 10 AdamW steps, in this process."""
    model, x, y = sc.model_and_batch(B)
    _, loss = model(tinygpt.tensor(x), tinygpt.tensor(y))
    loss.backward()
    truth = {"loss": float(loss.item()), **{"grad/" + n: p.grad.copy() for n, p in model.named_parameters()}}
    for name, make in (("sgd", lambda ps: optim.SGD(ps, lr=0.1)),
                       ("adamw", lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1))):
        model, x, y = sc.model_and_batch(B)
        opt = make(model.parameters())
        losses = []
        for _ in range(10):
            _, loss = model(tinygpt.tensor(x), tinygpt.tensor(y))
            loss.backward()
            losses.append(float(loss.item()))
            opt.step()
            opt.zero_grad()
        truth[name + "/losses"] = np.array(losses)
        truth.update({f"{name}/{n}": p.numpy().copy() for n, p in model.named_parameters()})
    return truth


def check_against_one_process(got, B):
    truth = one_process(B)
    names = [n for n, _ in sc.model_and_batch(B)[0].named_parameters()]
    assert float(got["loss"]) == pytest.approx(truth["loss"], rel=1e-6)
    for n in names:
        np.testing.assert_allclose(got["grad/" + n], truth["grad/" + n], rtol=1e-5, atol=1e-7, err_msg=n)
        np.testing.assert_allclose(got["sgd/" + n], truth["sgd/" + n], rtol=0, atol=1e-6, err_msg=n)
    np.testing.assert_allclose(got["sgd/losses"], truth["sgd/losses"], rtol=1e-5)
    np.testing.assert_allclose(got["adamw/losses"], truth["adamw/losses"], rtol=1e-4)


@needs_mpi
@pytest.mark.parametrize("n,B", [(2, 6), (2, 5), (3, 2)])     # even; uneven; a rank with no rows
def test_ranks_match_one_process(tmp_path, n, B):
    rc, _, err, _ = run(scenario(n, "steps", tmp_path, B), tmp_path)
    assert rc == 0, err
    check_against_one_process(np.load(tmp_path / "steps.npz"), B)
    ranks = ranks_json(tmp_path, n)
    assert [r["world_size"] for r in ranks] == [n] * n
    assert sorted(r["local_rank"] for r in ranks) == list(range(n))          # one node
    assert all(r["digests"] == ranks[0]["digests"] for r in ranks)           # bit-identical on every rank


@needs_mpi
def test_nccl_code_path_with_a_stand_in_for_nccl(tmp_path):
    """No GPU here: tinygpt.cuda.nccl.Runtime is replaced by a stand-in whose allReduce/bcast do their work
    through MPI on the memory the pointer and count name. What is checked is tinygpt's side: the unique id
    made on rank 0 reaches every rank, each rank takes GPU local_rank % count, and the flat buffer's
    pointer, count and dtype carry the whole gradient (the numbers match one process)."""
    rc, _, err, _ = run(scenario(2, "nccl", tmp_path, 5), tmp_path)
    assert rc == 0, err
    check_against_one_process(np.load(tmp_path / "steps.npz"), 5)
    r0, r1 = ranks_json(tmp_path, 2)
    assert r0["ids"] == r1["ids"] and len(r0["ids"]) == 3 and len(set(map(tuple, r0["ids"]))) == 3
    assert [r0["chosen"], r1["chosen"]] == [r0["local_rank"] % 2, r1["local_rank"] % 2] == [0, 1]
    model = sc.model_and_batch(5)[0]
    params = list(model.parameters())
    count = sum(p.data.size for p in params) + len(params) + 2
    assert r0["calls"] == [["bcast", count], ["allReduce", count], ["bcast", count]]
    assert r0["digests"] == r1["digests"]


# --- the CLI: mpiexec -n 2 tinygpt train against tinygpt train --workers 1 ---------------------------------------
def flags(corpus, out_dir, *more):
    return ["train", "--data", str(corpus), "--n-layer", "2", "--n-head", "2", "--n-embd", "16",
            "--block-size", "8", "--batch-size", "6", "--eval-iters", "3", "--eval-interval", "3",
            "--warmup-iters", "2", "--lr-decay-iters", "40", "--no-progress", "--out-dir", str(out_dir), *more]


def logged(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def assert_same_losses(a, b):
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-3), (ra["iter"], key)


@needs_mpi
def test_cli_two_ranks_log_what_one_process_logs_and_resume_across_rank_counts(tmp_path, corpus):
    ref, two = tmp_path / "ref", tmp_path / "two"
    rc, out1, err, _ = run(tinygpt_cmd(*flags(corpus, ref, "--max-iters", "12", "--workers", "1")), tmp_path)
    assert rc == 0, err
    rc, out2, err, _ = run(mpiexec(2, *tinygpt_cmd(*flags(corpus, two, "--max-iters", "12"))), tmp_path)
    assert rc == 0, err
    assert_same_losses(logged(two), logged(ref))
    assert [r["iter"] for r in logged(two)] == [0, 3, 6, 9, 12]                # each line once
    for it in (0, 3, 6, 9, 12):
        assert out2.count(f"step {it}: ") == 1, out2
    assert out2.count("tinygpt: preset") == 1 and "2 ranks" in out2 and out2.count("tinygpt: done") == 1

    a, b = tmp_path / "a", tmp_path / "b"                     # 2 ranks -> 1 process; 1 process -> 2 ranks
    steps = [mpiexec(2, *tinygpt_cmd(*flags(corpus, a, "--max-iters", "6"))),
             tinygpt_cmd("train", "--resume", "--out-dir", str(a), "--max-iters", "12", "--workers", "1"),
             tinygpt_cmd(*flags(corpus, b, "--max-iters", "6", "--workers", "1")),
             mpiexec(2, *tinygpt_cmd("train", "--resume", "--out-dir", str(b), "--max-iters", "12",
                                     "--no-progress"))]
    for cmd in steps:
        rc, _, err, _ = run(cmd, tmp_path)
        assert rc == 0, (cmd, err)
    for d in (a, b):
        assert_same_losses(logged(d), logged(ref))
        assert checkpoint.load(checkpoint.checkpoint_path(d, "last")).meta["iter"] == 12


@needs_mpi
def test_weights_bit_identical_on_every_rank_and_in_rank_0s_checkpoint(tmp_path, corpus):
    """With dropout (each rank its own masks) and gradient accumulation, 3 ranks end with the same bits, and
    rank 0's checkpoint holds them."""
    (tmp_path / "x").mkdir()
    rc, _, err, _ = run(scenario(3, "train", tmp_path / "x", 7), tmp_path)
    assert rc == 0, err
    ranks = ranks_json(tmp_path / "x", 3)
    assert [r["iter"] for r in ranks] == [7, 7, 7]
    assert len({r["digest"] for r in ranks}) == 1
    assert all(r["host_rng"] == ranks[0]["host_rng"] and r["batch_rng"] == ranks[0]["batch_rng"] for r in ranks)
    path = checkpoint.checkpoint_path(tmp_path / "x" / "run", "last")
    model, _, _ = checkpoint.load_model(path)
    assert sc.digest(model) == ranks[0]["digest"]
    assert checkpoint.load(path).meta["rng"] == {"host": ranks[0]["host_rng"], "batches": ranks[0]["batch_rng"]}


def test_each_ranks_dropout_stream_is_seeded_from_the_shared_one():
    """Without MPI (a World told it is rank r of 2, whose collectives do nothing): forward_backward moves
    the shared host generator by exactly one draw, s, and runs this rank's rows under a generator seeded
    by (s, r); so the shared stream stays the same on every rank and the ranks' masks differ."""
    tinygpt.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(**{**sc.CFG.__dict__, "dropout": 0.5}))
    rng = np.random.default_rng(1)
    x, y = (rng.integers(0, sc.CFG.vocab_size, (4, sc.CFG.block_size)) for _ in range(2))
    for rank, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        world = distributed.World()
        world.rank, world.world_size, world.is_main = rank, 2, rank == 0
        ddp = distributed.DistributedDataParallel(model, world)
        tinygpt.manual_seed(7)
        share = ddp.forward_backward(x, y)
        shared = np.random.default_rng(7)
        s = int(shared.integers(2 ** 62))
        assert backend.get_rng_state() == shared.bit_generator.state           # one draw, and only one
        own = int(np.random.default_rng([s, rank]).integers(2 ** 62))
        backend.set_rng_state(np.random.default_rng(own).bit_generator.state)
        _, loss = model(tinygpt.tensor(x[rows]), tinygpt.tensor(y[rows]))
        assert float(share) == pytest.approx(float(loss.item()) / 2, rel=1e-6)
        backend.manual_seed(7)                                                   # the shared stream itself
        _, other = model(tinygpt.tensor(x[rows]), tinygpt.tensor(y[rows]))
        assert float(other.item()) != pytest.approx(float(loss.item()), rel=1e-6)   # is not what ran


# --- failures: nothing hangs, one line, no process left ---------------------------------------------------------
def assert_one_line_and_nothing_left(err, out_dir, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    time.sleep(1.0)
    assert [p for p in pids(out_dir) if alive(p)] == []


@needs_mpi
def test_a_rank_that_raises_ends_the_job_within_seconds(tmp_path, corpus):
    (tmp_path / "x").mkdir()
    rc, _, err, seconds = run(scenario(2, "raise", tmp_path / "x", 3), tmp_path)
    assert rc != 0 and seconds < 15, (rc, seconds)
    assert len(pids(tmp_path / "x")) == 2
    assert_one_line_and_nothing_left(err, tmp_path / "x", "rank 1 of 2",
                                     "RuntimeError: injected failure at step 3")


@needs_mpi
def test_a_rank_that_stalls_is_aborted_by_the_collective_timeout(tmp_path, corpus):
    (tmp_path / "x").mkdir()
    rc, _, err, seconds = run(scenario(2, "stall", tmp_path / "x", 2), tmp_path,
                              **{distributed.TIMEOUT_ENV: "2"})
    assert rc != 0 and seconds < 15, (rc, seconds)
    assert_one_line_and_nothing_left(err, tmp_path / "x", "rank 0 of 2", "all-reduce of the gradients",
                                     "did not complete within 2 s")


@needs_mpi
@pytest.mark.parametrize("who,rank", [("all", 0), ("one", 1)])
def test_an_error_is_said_once_and_ends_every_rank(tmp_path, who, rank):
    rc, _, err, seconds = run(scenario(2, "fail", tmp_path, who), tmp_path)
    assert rc == 2 and seconds < 15, (rc, seconds, err)
    assert_one_line_and_nothing_left(err, tmp_path, f"tinygpt: error: rank {rank} of 2: injected error on rank "
                                                    f"{rank}")


@needs_mpi
def test_a_cli_error_under_mpiexec_is_one_line(tmp_path, corpus):
    rc, _, err, _ = run(mpiexec(2, *tinygpt_cmd(*flags(tmp_path / "missing.txt", tmp_path / "o"))), tmp_path)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tinygpt: error: rank 0 of 2: "), err


def wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.05)


@needs_mpi
def test_sigint_to_one_rank_stops_every_rank_on_the_same_iteration(tmp_path, corpus):
    (tmp_path / "x").mkdir()
    proc = subprocess.Popen(scenario(2, "interrupt", tmp_path / "x"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path), start_new_session=True)
    try:
        wait_for(lambda: len(pids(tmp_path / "x")) == 2)
        time.sleep(1.5)                                         # a few iterations in
        os.kill(pids(tmp_path / "x")[1], signal.SIGINT)         # rank 1 only
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    r0, r1 = ranks_json(tmp_path / "x", 2)
    assert r0["iter"] == r1["iter"] > 0 and r0["digest"] == r1["digest"]
    saved = checkpoint.load(checkpoint.checkpoint_path(tmp_path / "x" / "run", "last"))
    assert saved.meta["iter"] == r0["iter"]


@needs_mpi
def test_ctrl_c_on_mpiexec_saves_once_and_resumes(tmp_path, corpus):
    out_dir = tmp_path / "o"
    proc = subprocess.Popen(mpiexec(2, *tinygpt_cmd(*flags(corpus, out_dir, "--max-iters", "100000",
                                                           "--eval-interval", "1000"))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            start_new_session=True)
    try:
        wait_for(lambda: (out_dir / "log.jsonl").is_file())     # evaluated at iteration 0: training now
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGINT)                         # mpiexec forwards it to every rank
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    saved = checkpoint.load(checkpoint.checkpoint_path(out_dir, "last"))
    k = saved.meta["iter"]
    assert err.count(f"interrupted at iteration {k}; saved") == 1, err
    rc, _, err, _ = run(tinygpt_cmd("train", "--resume", "--out-dir", str(out_dir), "--max-iters", str(k + 2),
                                    "--workers", "1", "--no-progress"), tmp_path)
    assert rc == 0, err
    assert checkpoint.load(checkpoint.checkpoint_path(out_dir, "last")).meta["iter"] == k + 2


def test_each_rank_picks_its_gpu_before_the_cuda_check(monkeypatch):
    """A rank on GPU local_rank % count, chosen before backend's CUDA check opens a context anywhere."""
    events = []

    class FakeCuda:
        class runtime:
            @staticmethod
            def getDeviceCount():
                return 2

        class Device:
            def __init__(self, index):
                self.index = index

            def use(self):
                events.append(("use", self.index))

    fake = type("FakeCupy", (), {"cuda": FakeCuda})
    monkeypatch.setattr(backend, "_cupy", fake)
    monkeypatch.setattr(backend, "cuda_problem", lambda: events.append(("check",)) or "no GPU here")
    monkeypatch.setattr(distributed, "launched", lambda: False)
    world = distributed.World()
    world.local_rank, world.world_size = 3, 2
    monkeypatch.setattr(distributed, "_world", world)
    with pytest.raises(backend.CudaUnavailableError, match="no GPU here"):
        distributed.init("cuda")
    assert events == [("use", 1), ("check",)]              # GPU 3 % 2 first, the check after
    assert world.use_gpu() == 1 and events.count(("use", 1)) == 1
