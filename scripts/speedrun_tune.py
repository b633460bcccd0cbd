"""Tune a fast preset on a development split carved from the TRAINING text, never on validation.

    python scripts/speedrun_tune.py --preset cpu --max-iters 1000 --lr-decay-iters 1000 --seed 1337
    python scripts/speedrun_tune.py --preset speedrun --seeds 1337 1 2 --log /tmp/tune.jsonl

Tiny Shakespeare as `tinygpt train` splits it (first 90% train, last 10% val); the last --dev-frac (5%) of the
train split becomes the development split: the run trains on the rest and its evaluations read the dev split
(the Trainer's "val" line is the dev loss here). The real validation split is never read. At the end the
final weights are scored on --batches (200) fixed dev batches of 12 rows at the model's block size
(np.random.default_rng([424242, 0, 1]), as tests/nanogpt_torch.py evaluate draws its val batches), and one
JSON line per seed (settings, training wall time to the final eval, dev loss ± standard error) is printed
and appended to --log. Any RunSettings field is a flag (--lr, --n-embd, --optimizer, ...), as in `tinygpt train`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

import tinygpt
from tinygpt import data
from tinygpt.settings import RunSettings, add_flags
from tinygpt.train import Trainer

EVAL_SEED = 424242


def dev_score(model, dev_ids: np.ndarray, batches: int) -> tuple[float, float]:
    """Mean and standard error of the loss on `batches` fixed dev batches (12 rows, the model's block)."""
    rng = np.random.default_rng([EVAL_SEED, 0, 1])
    model.eval()
    with tinygpt.no_grad():
        losses = [model(*data.get_batch(dev_ids, 12, model.config.block_size, rng))[1].item()
                  for _ in range(batches)]
    return float(np.mean(losses)), float(np.std(losses, ddof=1) / math.sqrt(batches))


def run_one(settings: RunSettings, dev_frac: float, batches: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="speedrun_tune_") as out:
        from dataclasses import replace
        trainer = Trainer(replace(settings, out_dir=out), progress=False, out=open(os.devnull, "w"))
        cut = int(len(trainer.train_ids) * (1 - dev_frac))
        dev = trainer.train_ids[cut:]
        trainer.train_ids, trainer.val_ids = trainer.train_ids[:cut], dev   # validation is never touched
        result = trainer.run()
        mean, se = dev_score(trainer.model, dev, batches)
    return {"seed": settings.seed, "wall_s": round(result.elapsed_s, 2), "dev": round(mean, 4),
            "dev_se": round(se, 4), "iters": result.iter}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flags(p, RunSettings, defaults=False)
    p.add_argument("--seeds", type=int, nargs="+", help="several seeds (overrides --seed)")
    p.add_argument("--dev-frac", type=float, default=0.05)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--log", default="/tmp/speedrun_tune.jsonl")
    p.add_argument("--note", default="")
    a = vars(p.parse_args(argv))
    seeds, dev_frac, batches, log, note = (a.pop(k) for k in ("seeds", "dev_frac", "batches", "log", "note"))
    preset = a.pop("preset") or "cpu"
    a.setdefault("data", None)
    a["data"] = a["data"] or "shakespeare"
    given = {k: v for k, v in a.items() if v is not None}
    rows = []
    for seed in seeds or [given.pop("seed", 1337)]:
        given.pop("seed", None)
        s = RunSettings.from_preset(preset, seed=seed, **given)
        load = os.getloadavg()[0]
        row = {"preset": preset, "overrides": {k: v for k, v in given.items() if k != "data"}, **run_one(
            s, dev_frac, batches), "load": round(load, 2), "note": note, "time": time.strftime("%H:%M:%S")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
    if len(rows) > 1:
        devs = [r["dev"] for r in rows]
        print(f"mean dev {np.mean(devs):.4f} ± {np.std(devs, ddof=1) / math.sqrt(len(devs)):.4f}, "
              f"mean wall {np.mean([r['wall_s'] for r in rows]):.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
