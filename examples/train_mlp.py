"""Train a tiny MLP on XOR with tinygpt's nn and optim (no PyTorch anywhere)."""
import tinygpt
import tinygpt.functional as F
from tinygpt import nn, optim

tinygpt.manual_seed(0)
X = tinygpt.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # the four inputs, (4, 2)
y = tinygpt.tensor([0, 1, 1, 0])                                      # XOR of each row, as class ids

model = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 2))   # logits for classes 0 and 1
opt = optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)

for step in range(200):
    loss = F.cross_entropy(model(X), y)   # mean of -log softmax(logits)[target]
    opt.zero_grad()                       # forget the last step's gradients
    loss.backward()                       # d(loss)/d(every parameter) into p.grad
    opt.step()                            # the AdamW update, in place
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")

print(f"final loss {F.cross_entropy(model(X), y).item():.5f}")
print("predictions", model(X).numpy().argmax(axis=1))
