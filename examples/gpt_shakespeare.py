"""Train a GPT on Tiny Shakespeare with the tinygpt library (no CLI): the whole loop on one screen.

    python examples/gpt_shakespeare.py                    # nanoGPT's CPU run: val loss ≈ 1.9 in 2000 steps
    python examples/gpt_shakespeare.py --max-iters 200    # a quick look
    python examples/gpt_shakespeare.py --device cuda --preset video   # the lecture's 10.8M-parameter GPT

`tinygpt train` does the same plus checkpoints you can resume, logs and a progress bar (tinygpt/train.py).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import tinygpt  # noqa: E402
from tinygpt import checkpoint, data, models, optim, presets  # noqa: E402
from tinygpt.sample import sample_text  # noqa: E402
from tinygpt.tokenizers import CharTokenizer  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu", choices=["cpu", "video"])
    p.add_argument("--data", default="shakespeare", help="shakespeare (default), python-stdlib or a .txt")
    p.add_argument("--max-iters", type=int, default=None, help="stop here (the lr schedule stays the preset's)")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--save", default=None, help="write a checkpoint here (e.g. out/ckpt.safetensors)")
    args = p.parse_args(argv)
    hp = presets.get_preset(args.preset)          # block_size, batch_size, lr, schedule, model shape ...
    max_iters = hp.max_iters if args.max_iters is None else args.max_iters
    device = tinygpt.get_device(args.device)
    tinygpt.manual_seed(1337)

    # data: characters -> ids; 90% train, 10% validation
    text = data.load_text(args.data)
    tok = CharTokenizer.from_text(text)
    ids = data.encode_cached(text, tok, name="gpt-example")
    train_data, val_data = data.train_val_split(ids, 0.9)
    batch_rng = np.random.default_rng(1337)

    # model: the preset's GPT for this vocabulary
    model = models.model_from_config(hp.model_config(tok.vocab_size), device=device)
    print(f"{model.num_parameters() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, device {device.name}")

    # optimizer: AdamW, weight decay only on matrices (≥ 2-D); warmup + cosine, or a constant lr
    optimizer = optim.AdamW(optim.weight_decay_groups(model, hp.weight_decay), lr=hp.lr,
                            betas=(hp.beta1, hp.beta2))
    schedule = (optim.WarmupCosineLR(hp.lr, hp.warmup_iters, hp.lr_decay_iters, hp.min_lr) if hp.decay_lr
                else optim.ConstantLR(hp.lr))

    def estimate_loss(it):
        """Mean loss of eval_iters batches per split, in eval mode (no dropout) without a graph."""
        out = {}
        model.eval()
        with tinygpt.no_grad():
            for i, (name, split) in enumerate((("train", train_data), ("val", val_data))):
                rng = np.random.default_rng([1337, it, i])
                out[name] = np.mean([model(*data.get_batch(split, hp.batch_size, hp.block_size, rng, device))[1]
                                     .item() for _ in range(hp.eval_iters)])
        model.train()
        return out

    t0 = time.perf_counter()
    for it in range(max_iters + 1):
        if it % hp.eval_interval == 0 or it == max_iters:
            losses = estimate_loss(it)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)")
        if it == max_iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule(it)
        x, y = data.get_batch(train_data, hp.batch_size, hp.block_size, batch_rng, device)   # (B, T) each
        logits, loss = model(x, y)                                                          # (B, T, V), ()
        loss.backward()        # on a multi-core CPU, `tinygpt train` does these two lines on every core at
        #                        once: dp = tinygpt.parallel.DataParallel(model); dp.forward_backward(x, y)
        optim.clip_grad_norm_(model.parameters(), hp.grad_clip)
        optimizer.step()
        optimizer.zero_grad()

    if args.save:
        checkpoint.save(args.save, model, optimizer, {"iter": max_iters, "tokenizer": tok.to_dict()})
        print(f"saved {args.save}; sample it with tinygpt.checkpoint.load_model({args.save!r})")
    tinygpt.manual_seed(1337)
    print("-" * 40)
    sample_text(model, tok, prompt="\n", max_new_tokens=500, out=sys.stdout)
    print()


if __name__ == "__main__":
    main()
