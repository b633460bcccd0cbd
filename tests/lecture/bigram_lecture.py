"""The bigram language model in the shape of the "Let's build GPT" lecture's bigram.py, run on tinygpt.

Only the first three imports differ from the PyTorch version (tests/test_lecture.py swaps them back and
runs this same file under torch). It reads input.txt from the current directory. Any hyperparameter can be
changed from the environment: LECTURE_MAX_ITERS=300 python bigram_lecture.py
"""
import tinygpt as torch
import tinygpt.nn as nn
from tinygpt.nn import functional as F
import os


def setting(name, default):
    """A hyperparameter: `default`, unless the environment has LECTURE_<NAME>."""
    return type(default)(os.environ.get('LECTURE_' + name.upper(), default))


# hyperparameters
batch_size = setting('batch_size', 32)      # independent sequences per step
block_size = setting('block_size', 8)       # context length
max_iters = setting('max_iters', 3000)
eval_interval = setting('eval_interval', 300)
learning_rate = setting('learning_rate', 1e-2)
device = 'cuda' if torch.cuda.is_available() else 'cpu'
eval_iters = setting('eval_iters', 200)
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


class BigramLanguageModel(nn.Module):

    def __init__(self, vocab_size):
        super().__init__()
        # row i of the table holds the logits of the token that follows token i
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)   # (B, T, C)
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
            logits, loss = self(idx)
            logits = logits[:, -1, :]                            # the last step: (B, C)
            probs = F.softmax(logits, dim=-1)                    # (B, C)
            idx_next = torch.multinomial(probs, num_samples=1)   # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)              # (B, T+1)
        return idx


model = BigramLanguageModel(vocab_size)
m = model.to(device)

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
