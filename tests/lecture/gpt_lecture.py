"""The decoder-only Transformer in the shape of the "Let's build GPT" lecture's gpt.py, run on tinygpt.

Only the first three imports differ from the PyTorch version (tests/test_lecture.py swaps them back and
runs this same file under torch). It reads input.txt from the current directory. The defaults are the
lecture's (a 10.8M-parameter model: hours on a CPU); change any of them from the environment, e.g.
    LECTURE_N_LAYER=2 LECTURE_N_EMBD=64 LECTURE_BLOCK_SIZE=32 LECTURE_MAX_ITERS=200 python gpt_lecture.py
"""
import tinygpt as torch
import tinygpt.nn as nn
from tinygpt.nn import functional as F
import os


def setting(name, default):
    """A hyperparameter: `default`, unless the environment has LECTURE_<NAME>."""
    return type(default)(os.environ.get('LECTURE_' + name.upper(), default))


# hyperparameters
batch_size = setting('batch_size', 64)      # independent sequences per step
block_size = setting('block_size', 256)     # longest context the model sees
max_iters = setting('max_iters', 5000)
eval_interval = setting('eval_interval', 500)
learning_rate = setting('learning_rate', 3e-4)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
eval_iters = setting('eval_iters', 200)
n_embd = setting('n_embd', 384)
n_head = setting('n_head', 6)
n_layer = setting('n_layer', 6)
dropout = setting('dropout', 0.2)
max_new_tokens = setting('max_new_tokens', 500)
seed = setting('seed', 1337)
# ------------

torch.manual_seed(seed)

with open('input.txt', 'r', encoding='utf-8') as f:
    text = f.read()

# the vocabulary: every character in the text
chars = sorted(list(set(text)))
vocab_size = len(chars)
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
encode = lambda s: [stoi[c] for c in s]            # string -> list of ints
decode = lambda l: ''.join([itos[i] for i in l])   # list of ints -> string

# the first 90% trains, the rest is held out
data = torch.tensor(encode(text), dtype=torch.long)
n = int(0.9 * len(data))
train_data = data[:n]
val_data = data[n:]


def get_batch(split):
    # batch_size random windows; y is x moved one token along
    data = train_data if split == 'train' else val_data
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + block_size + 1] for i in ix])
    x, y = x.to(device), y.to(device)
    return x, y


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ['train', 'val']:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean()
    model.train()
    return out


class Head(nn.Module):
    """One head of causal self-attention."""

    def __init__(self, head_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        # the lower triangle: position t may look at positions 0..t
        self.register_buffer('tril', torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)     # (B, T, hs)
        q = self.query(x)   # (B, T, hs)
        # affinities, scaled by 1/sqrt(hs) so the softmax starts out diffuse
        wei = q @ k.transpose(-2, -1) * k.shape[-1]**-0.5   # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        v = self.value(x)   # (B, T, hs)
        out = wei @ v       # (B, T, T) @ (B, T, hs) -> (B, T, hs)
        return out


class MultiHeadAttention(nn.Module):
    """Several heads side by side, their outputs concatenated and projected."""

    def __init__(self, num_heads, head_size):
        super().__init__()
        self.heads = nn.ModuleList([Head(head_size) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        out = self.dropout(self.proj(out))
        return out


class FeedForward(nn.Module):
    """A per-token MLP: widen by 4, ReLU, project back."""

    def __init__(self, n_embd):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Communication (attention) then computation (feed-forward), each pre-norm with a residual."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_head, head_size)
        self.ffwd = FeedForward(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):

    def __init__(self):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head=n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)                                 # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=device))   # (T, C)
        x = tok_emb + pos_emb      # (B, T, C)
        x = self.blocks(x)         # (B, T, C)
        x = self.ln_f(x)           # (B, T, C)
        logits = self.lm_head(x)   # (B, T, vocab_size)
        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            logits = logits.view(B * T, C)
            targets = targets.view(B * T)
            loss = F.cross_entropy(logits, targets)
        return logits, loss

    def generate(self, idx, max_new_tokens):
        # idx: (B, T) ids of the context so far
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -block_size:]                      # at most block_size tokens of context
            logits, loss = self(idx_cond)
            logits = logits[:, -1, :]                            # the last step: (B, C)
            probs = F.softmax(logits, dim=-1)                    # (B, C)
            idx_next = torch.multinomial(probs, num_samples=1)   # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)              # (B, T+1)
        return idx


model = GPTLanguageModel()
m = model.to(device)
print(sum(p.numel() for p in m.parameters()) / 1e6, 'M parameters')

optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)

for iter in range(max_iters):

    # now and then, the mean loss over eval_iters batches of each split
    if iter % eval_interval == 0 or iter == max_iters - 1:
        losses = estimate_loss()
        print(f"step {iter}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    xb, yb = get_batch('train')

    logits, loss = model(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

context = torch.zeros((1, 1), dtype=torch.long, device=device)
print(decode(m.generate(context, max_new_tokens=max_new_tokens)[0].tolist()))
