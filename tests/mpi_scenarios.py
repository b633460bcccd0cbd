"""What tests/test_distributed.py runs under `mpiexec -n N python tests/mpi_scenarios.py SCENARIO OUT [ARGS]`.

Each scenario writes what it saw into the folder OUT (rank 0's arrays, every rank's JSON); the test compares
that with a truth it computes itself, in one process, without tinygpt.distributed.

    steps OUT B       the gradient of one batch, 10 SGD steps, 10 AdamW steps (the batch of `batch(B)`)
    train OUT K       a tiny Trainer run (dropout, 2 micro-batches) to iteration K; each rank writes its
                      iteration and its weights' digest
    interrupt OUT     a long Trainer run; each rank writes its pid; a SIGINT to one rank stops them all
    raise OUT K       rank 1 raises RuntimeError at iteration K
    stall OUT K       rank 1 sleeps at iteration K (run with a short TINYGPT_COLLECTIVE_TIMEOUT)
    fail OUT WHO      distributed.fail(...) on rank 1 ("one") or on every rank ("all")
    nccl OUT B        the NCCL transport with a stand-in for cupy.cuda.nccl (below), on host arrays
"""
import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import tinygpt
from tinygpt import distributed, optim
from tinygpt.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, bias=True)
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=5, eval_iters=3, eval_interval=4,
            warmup_iters=2, lr_decay_iters=40)


def model_and_batch(B: int, seed: int = 0):
    """The same GPT and batch in every process (the test builds its truth from this function too)."""
    tinygpt.manual_seed(seed)
    model = GPT(CFG)
    rng = np.random.default_rng(seed)
    x, y = (rng.integers(0, CFG.vocab_size, (B, CFG.block_size)) for _ in range(2))
    return model, x, y


def digest(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode() + np.ascontiguousarray(p.numpy()).tobytes())
    return h.hexdigest()


def write_json(out: Path, rank: int, **values) -> None:
    (out / f"rank{rank}.json").write_text(json.dumps(values))


def steps(out: Path, B: int, runtime=None) -> None:
    """Gradient of one batch; then 10 SGD and 10 AdamW steps on it (fresh models)."""
    world = distributed.init()
    model, x, y = model_and_batch(B)
    ddp = distributed.DistributedDataParallel(model, world, runtime)
    loss = ddp.sync(ddp.forward_backward(x, y))
    saved = {"loss": np.asarray(loss)}
    saved.update({"grad/" + n: p.grad.copy() for n, p in model.named_parameters()})
    digests = {}
    for name, make in (("sgd", lambda ps: optim.SGD(ps, lr=0.1)),
                       ("adamw", lambda ps: optim.AdamW(ps, lr=1e-2, weight_decay=0.1))):
        model, x, y = model_and_batch(B)
        ddp = distributed.DistributedDataParallel(model, world, runtime)
        opt = make(model.parameters())
        losses = []
        for _ in range(10):
            losses.append(float(ddp.sync(ddp.forward_backward(x, y))))
            opt.step()
            opt.zero_grad()
        saved[name + "/losses"] = np.array(losses)
        saved.update({f"{name}/{n}": p.numpy().copy() for n, p in model.named_parameters()})
        digests[name] = digest(model)
    if world.is_main:
        np.savez(out / "steps.npz", **saved)
    write_json(out, world.rank, digests=digests, world_size=world.world_size, local_rank=world.local_rank)


def trainer(out: Path, **kw):
    from tinygpt.train import RunSettings, Trainer
    settings = RunSettings.from_preset("cpu", **dict(TINY, data=str(out.parent / "corpus.txt"),
                                                     out_dir=str(out / "run"), **kw))
    return Trainer(settings, progress=False, out=sys.stdout)


def train(out: Path, k: int) -> None:
    t = trainer(out, max_iters=k, dropout=0.2, grad_accum=2)
    t.run()
    from tinygpt import backend
    write_json(out, t.world.rank, iter=t.iter, digest=digest(t.model), host_rng=backend.get_rng_state(),
               batch_rng=t.batch_rng.bit_generator.state)


def interrupt(out: Path) -> None:
    from tinygpt.train import TrainingInterrupted
    t = trainer(out, max_iters=100000, eval_interval=1000)
    rank = t.world.rank
    (out / f"pid{rank}").write_text(str(os.getpid()))
    try:
        t.run()
    except TrainingInterrupted as e:
        write_json(out, rank, iter=t.iter, digest=digest(t.model), message=str(e))


def misbehave(out: Path, k: int, how: str) -> None:
    t = trainer(out, max_iters=1000, eval_interval=1000)
    (out / f"pid{t.world.rank}").write_text(str(os.getpid()))
    step = t.train_step

    def train_step():
        if t.world.rank == 1 and t.iter == k:
            if how == "raise":
                raise RuntimeError(f"injected failure at step {k}")
            time.sleep(600)
        return step()
    t.train_step = train_step
    t.run()


def fail(out: Path, who: str) -> None:
    world = distributed.init()
    (out / f"pid{world.rank}").write_text(str(os.getpid()))
    if who == "all" or world.rank == 1:
        sys.exit(distributed.fail(f"tinygpt: error: injected error on rank {world.rank}", 2))
    world.allreduce_(np.zeros(1), "a test all-reduce")


class StandInNccl:
    """cupy.cuda.nccl and the CUDA runtime as tinygpt.cuda.nccl.Runtime offers them, for host arrays: the
    unique id is a random one (rank 0's must reach every rank), devices are counted and chosen, and
    allReduce/bcast do their work through MPI on the memory the pointer and count name. It stands in for
    the transport only: what is summed, where, and how much is tinygpt.distributed's."""

    SUM = 0

    def __init__(self, world, devices: int = 2):
        self.world, self.devices, self.chosen, self.calls = world, devices, None, []
        self.ids = []

    def device_count(self):
        return self.devices

    def use_device(self, index):
        self.chosen = index

    def unique_id(self):
        return tuple(int(v) for v in np.random.default_rng().integers(-128, 128, 128))

    def communicator(self, size, uid, rank):
        self.ids.append(uid)
        return _StandInComm(self, size, rank)

    def nccl_type(self, dtype):
        return {np.dtype(np.float32): 7, np.dtype(np.float64): 8}[np.dtype(dtype)]

    def pointer(self, array):
        return array.ctypes.data

    def stream(self):
        return 0

    def record_event(self):
        return type("Event", (), {"done": True})()


class _StandInComm:
    def __init__(self, rt, size, rank):
        self.rt, self.size, self.rank = rt, size, rank

    def _array(self, ptr, count, datatype):
        ctype = {7: ctypes.c_float, 8: ctypes.c_double}[datatype]
        return np.ctypeslib.as_array((ctype * count).from_address(ptr))

    def allReduce(self, send, recv, count, datatype, op, stream):
        assert send == recv and op == StandInNccl.SUM
        self.rt.calls.append(("allReduce", count))
        self.rt.world.allreduce_(self._array(recv, count, datatype))

    def bcast(self, buff, count, datatype, root, stream):
        self.rt.calls.append(("bcast", count))
        self.rt.world.broadcast_(self._array(buff, count, datatype))

    def abort(self):
        pass


def nccl(out: Path, B: int) -> None:
    world = distributed.init()
    rt = StandInNccl(world)
    steps(out, B, runtime=rt)
    write_json(out, world.rank, ids=[list(u) for u in rt.ids], chosen=rt.chosen, calls=rt.calls[:3],
               **json.loads((out / f"rank{world.rank}.json").read_text()))


if __name__ == "__main__":
    scenario, out = sys.argv[1], Path(sys.argv[2])
    args = sys.argv[3:]
    {"steps": lambda: steps(out, int(args[0])), "train": lambda: train(out, int(args[0])),
     "interrupt": lambda: interrupt(out), "raise": lambda: misbehave(out, int(args[0]), "raise"),
     "stall": lambda: misbehave(out, int(args[0]), "stall"), "fail": lambda: fail(out, args[0]),
     "nccl": lambda: nccl(out, int(args[0]))}[scenario]()
