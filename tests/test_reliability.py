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
        text = ("a" * n + " " * n + "ab" * n + "!" * n)
        tok._cache.clear()
        t0 = time.perf_counter()
        tok.encode(text)
        return time.perf_counter() - t0
    cost(200)
    small, big = min(cost(2000) for _ in range(3)), min(cost(16000) for _ in range(3))
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
