"""The same GPT in PyTorch eager, for `tinygpt bench` to race against. Optional and benchmark-only.

tinygpt never needs PyTorch: this module is imported by the benchmark alone, and only when torch is
installed. The architecture mirrors tinygpt.models.GPT line for line (nanoGPT's names, pre-LayerNorm,
one c_attn projection, fused scaled_dot_product_attention), and it loads tinygpt's state_dict, so the
two start from identical weights and their first losses can be compared as a sanity check.
"""
from __future__ import annotations

from typing import Any


def version() -> str:
    """torch's version; raises ImportError when torch is not installed."""
    import torch
    return torch.__version__


def build(config: Any, state_dict: dict, device: str):
    """A torch nn.Module equal to tinygpt's GPT(config) with weights `state_dict` (host NumPy arrays)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    C, nh = config.n_embd, config.n_head

    class Attention(nn.Module):
        """Causal self-attention, all heads at once: x (B, T, C) -> (B, T, C)."""

        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C, bias=config.attn_bias)
            self.c_proj = nn.Linear(C, C, bias=config.bias)
            self.resid_dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))   # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=config.dropout if self.training else 0.0)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    class MLP(nn.Module):
        """C -> 4C -> GELU or ReLU -> C, position by position: (B, T, C) -> (B, T, C)."""

        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(C, 4 * C, bias=config.bias)
            self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
            self.c_proj = nn.Linear(4 * C, C, bias=config.bias)
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, x):
            return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    class Block(nn.Module):
        """Pre-LayerNorm residual block: x + attn(ln_1(x)), then + mlp(ln_2(·)); (B, T, C) -> (B, T, C)."""

        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C, bias=config.bias)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(C, bias=config.bias)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        """GPT with nanoGPT's parameter names: forward(idx (B, T), targets (B, T)) -> the mean loss (0-d)."""

        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, C), wpe=nn.Embedding(config.block_size, C),
                drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block() for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(C, bias=config.bias)))
            self.lm_head = nn.Linear(C, config.vocab_size, bias=config.bias and not config.tie_weights)
            if config.tie_weights:
                self.lm_head.weight = self.transformer.wte.weight

        def forward(self, idx, targets):
            T = idx.shape[1]
            pos = torch.arange(T, device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = TorchGPT()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}, strict=True)
    return model.to(device)


def make_step(model: Any, idx: Any, targets: Any, lr: float, weight_decay: float, betas: tuple,
              plain: bool = False):
    """A training step closure: forward, backward, clip at 1.0, AdamW (decay on 2-D weights only). plain: the
    loop of a learner's script instead (forward, zero_grad, backward, AdamW over all parameters, no clip)."""
    import torch

    if plain:
        popt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
        pidx, ptgt = (torch.as_tensor(a).to(next(model.parameters()).device) for a in (idx, targets))

        def plain_step():
            loss = model(pidx, ptgt)
            popt.zero_grad()
            loss.backward()
            popt.step()
            return loss

        return plain_step
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    idx_t, tgt_t = (torch.as_tensor(a).to(next(model.parameters()).device) for a in (idx, targets))

    def step():
        loss = model(idx_t, tgt_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    return step


def add_op_cases(a: Any, b: Any, g: Any) -> tuple:
    """torch's side of bench --op-overhead: (forward, forward + backward) callables of a + b on copies of the
    NumPy arrays a, b (leaves that require grad), backward with g, the grads set to None first."""
    import torch
    at, bt = (torch.tensor(v, requires_grad=True) for v in (a, b))
    gt = torch.from_numpy(g)

    def forward_backward():
        at.grad = bt.grad = None
        (at + bt).backward(gt)

    return (lambda: at + bt), forward_backward


def set_num_threads(n: int) -> int:
    """Give torch's intra-op pool n threads; returns how many it had (ImportError without torch)."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def synchronize(device: str) -> None:
    """Wait for torch's queued CUDA work (a no-op on the CPU); called before reading a clock."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(device: str, run: Any = None) -> int | None:
    """The most bytes torch's tensors held at once on CUDA while `run()` ran (the peak counter reset first,
    so nothing before counts: not tinygpt's arrays, which live in CuPy's pool, nor torch's warm-up); since
    the start of the process without `run`. None on the CPU, where the benchmark reads the process RSS."""
    import torch
    if device != "cuda":
        return None
    if run is not None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())
