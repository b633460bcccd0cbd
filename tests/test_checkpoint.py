"""Checkpoints: safetensors + JSON round trips, tied weights, atomic writes, corruption, no pickle."""
import json
import os
import pickle
import struct

import numpy as np
import pytest

from tinygpt import checkpoint, models, optim, tokenizers
from tinygpt.checkpoint import CheckpointError
from tinygpt.models import GPT, BigramLanguageModel, GPTConfig

CFG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)


def trained_pair(tie=True):
    """A GPT and its AdamW after two steps (so the moments and step counts are non-trivial)."""
    m = GPT(GPTConfig(**CFG, tie_weights=tie))
    opt = optim.AdamW(optim.weight_decay_groups(m, 0.1), lr=1e-2)
    x = np.random.default_rng(0).integers(0, 11, (2, 8))
    for _ in range(2):
        m(x, x)[1].backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def read_header(path):
    """The safetensors layout, parsed by hand: u64 little-endian length, then that many bytes of JSON."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw


def test_round_trip_model_optimizer_and_meta(tmp_path):
    m, opt = trained_pair()
    tok = tokenizers.CharTokenizer("abcdefghijk")
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 7, "tokenizer": tok.to_dict(),
                                                               "rng": {"x": 2 ** 100}})
    ck = checkpoint.load(path)
    assert ck.iter == 7 and ck.meta["rng"]["x"] == 2 ** 100          # big ints survive (PCG64 states)
    assert ck.meta["model_config"] == m.config_dict()
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(ck.model_state[k], v)
    saved = opt.state_dict()
    for i, st in saved["state"].items():
        assert ck.optim_state["state"][i]["step"] == st["step"] == 2
        np.testing.assert_array_equal(ck.optim_state["state"][i]["exp_avg"], st["exp_avg"])
        np.testing.assert_array_equal(ck.optim_state["state"][i]["exp_avg_sq"], st["exp_avg_sq"])
    opt2 = optim.AdamW(optim.weight_decay_groups(GPT(GPTConfig(**CFG)), 0.1), lr=1.0)
    opt2.load_state_dict(ck.optim_state)
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.999)


def test_tied_weight_is_stored_once_and_retied_on_load(tmp_path):
    m, opt = trained_pair(tie=True)
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"tokenizer": tokenizers.CharTokenizer(
        "abcdefghijk").to_dict()})
    header, _ = read_header(path)
    assert "model.transformer.wte.weight" in header and "model.lm_head.weight" not in header
    m2, tok, _ = checkpoint.load_model(path)
    assert m2.lm_head.weight is m2.transformer.wte.weight
    np.testing.assert_array_equal(m2.lm_head.weight.numpy(), m.lm_head.weight.numpy())
    assert tok.decode([0, 10]) == "ak"


def test_untied_and_bigram_models_round_trip(tmp_path):
    m, opt = trained_pair(tie=False)
    m2, _, _ = checkpoint.load_model(checkpoint.save(tmp_path / "a.safetensors", m, opt))
    assert m2.lm_head.weight is not m2.transformer.wte.weight
    np.testing.assert_array_equal(m2.lm_head.weight.numpy(), m.lm_head.weight.numpy())
    b = BigramLanguageModel(5)
    b2, _, ck = checkpoint.load_model(checkpoint.save(tmp_path / "b.safetensors", b))
    np.testing.assert_array_equal(b2.token_embedding_table.weight.numpy(), b.token_embedding_table.weight.numpy())
    assert ck.optim_state is None


def test_file_is_plain_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 1})
    header, raw = read_header(path)
    meta = json.loads(header["__metadata__"]["tinygpt"])
    assert meta["format"] == "tinygpt-checkpoint" and meta["iter"] == 1
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")

    def boom(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    checkpoint.load_model(path)


def test_failed_write_leaves_the_old_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 1})
    before = path.read_bytes()
    import safetensors.numpy

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", half_write)
    with pytest.raises(checkpoint.CheckpointWriteError, match="disk full"):
        checkpoint.save(path, m, opt, {"iter": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_file_mode_follows_umask(tmp_path):
    m, opt = trained_pair()
    old = os.umask(0o022)
    try:
        path = checkpoint.save(tmp_path / "c.safetensors", m, opt)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "garbage", "empty", "bad_json", "not_ours"])
def test_damaged_checkpoints_raise_one_line_checkpoint_error(tmp_path, damage):
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 1})
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip_data":
        raw[-5] ^= 0xFF                      # inside the last tensor's bytes: only the checksum sees it
    elif damage == "garbage":
        raw = bytearray(os.urandom(300))
    elif damage == "empty":
        raw = bytearray()
    elif damage == "bad_json":
        header, _ = read_header(path)
        header["__metadata__"]["tinygpt"] = "{not json"
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        n = struct.unpack("<Q", raw[:8])[0]
        raw = bytearray(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    elif damage == "not_ours":
        from safetensors.numpy import save_file
        save_file({"w": np.zeros(3, np.float32)}, str(path))
        raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and "c.safetensors" in str(e.value)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match="tinygpt train"):
        checkpoint.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.find_checkpoint(tmp_path)


def test_checkpoint_with_wrong_shapes_for_its_config_is_rejected(tmp_path, monkeypatch):
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"model_config": {**m.config_dict(),
                                                                                  "n_embd": 32}})
    monkeypatch.setattr(models, "model_from_config", never_called)
    with pytest.raises(CheckpointError, match=r"does not add up: .*wte.weight has shape \(11, 32\), but the "
                                              r"file holds shape \(11, 16\)"):
        checkpoint.load_model(path)


def never_called(*a, **k):
    raise AssertionError("a model was built from a header that does not match its tensors")


def rewrite_meta(path, edit):
    """Change the tinygpt JSON inside a saved file with `edit(meta)`; recompute the digest if `rehash`."""
    header, raw = read_header(path)
    n = struct.unpack("<Q", raw[:8])[0]
    meta = json.loads(header["__metadata__"]["tinygpt"])
    edit(meta)
    header["__metadata__"]["tinygpt"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def rehash(meta, path):
    """What a forger would do: a header edited with a digest that matches it (it is a checksum, not a
    signature)."""
    from safetensors.numpy import load_file
    tensors = load_file(str(path))
    meta["sha256"] = checkpoint._digest(tensors, meta)


@pytest.mark.parametrize("claim", [dict(n_embd=1 << 20, n_layer=4096), dict(vocab_size=1 << 30),
                                   dict(block_size=1 << 28), dict(n_layer=100_000)])
def test_a_header_claiming_a_huge_model_allocates_nothing(tmp_path, monkeypatch, claim):
    """Metadata (digest recomputed, so only the shape check can see it) that describes a model of terabytes:
    refused from the tensors' shapes in well under a second, before model_from_config runs."""
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 1})

    def edit(meta):
        meta["model_config"].update(claim)
        rehash(meta, path)
    rewrite_meta(path, edit)
    monkeypatch.setattr(models, "model_from_config", never_called)
    with pytest.raises(CheckpointError, match="does not add up") as e:
        checkpoint.load_model(path)
    assert "\n" not in str(e.value)


def test_the_digest_covers_the_header(tmp_path):
    """An edited header without a new digest is corrupt, like a flipped tensor byte (here the iteration:
    a resumed run would otherwise continue from the wrong step)."""
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 5})
    assert checkpoint.load(path).iter == 5
    rewrite_meta(path, lambda meta: meta.update(iter=6))
    with pytest.raises(CheckpointError, match="corrupt: its tensors or header do not match"):
        checkpoint.load(path)


def test_version_1_checkpoints_still_load(tmp_path):
    """Files written before the header was covered: version 1, a digest of the tensors alone."""
    from safetensors.numpy import load_file
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 3})
    tensors = load_file(str(path))

    def to_v1(meta):
        del meta["sha256"]
        meta.update(version=1, tensors_sha256=checkpoint._digest(tensors))
    rewrite_meta(path, to_v1)
    m2, _, ck = checkpoint.load_model(path)
    assert ck.iter == 3 and ck.meta["version"] == 1
    np.testing.assert_array_equal(m2.lm_head.weight.numpy(), m.lm_head.weight.numpy())
    rewrite_meta(path, lambda meta: meta.update(version=3))
    with pytest.raises(CheckpointError, match="format version 3"):
        checkpoint.load(path)


def test_tokenizer_that_does_not_match_the_embedding_is_refused(tmp_path, monkeypatch):
    m, opt = trained_pair()                                           # vocab 11
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"tokenizer": tokenizers.CharTokenizer(
        "abcde").to_dict()})
    monkeypatch.setattr(models, "model_from_config", never_called)
    with pytest.raises(CheckpointError, match="char tokenizer of 5 tokens with a model whose embedding has "
                                              "11 rows") as e:
        checkpoint.load_model(path)
    assert "\n" not in str(e.value)


def test_write_error_keeps_the_errno_and_says_the_old_file_is_kept(tmp_path, monkeypatch):
    """safetensors reports a full disk as a SafetensorError (not an OSError): it becomes one
    CheckpointWriteError, an OSError with errno ENOSPC (the real full disk: tests/test_reliability.py)."""
    import errno

    import safetensors.numpy
    m, opt = trained_pair()
    path = checkpoint.save(tmp_path / "c.safetensors", m, opt, {"iter": 1})

    class SafetensorError(Exception):
        pass

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\x00" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        checkpoint.save(path, m, opt, {"iter": 2})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert "free some disk space" in str(e.value) and "unchanged" in str(e.value)
    assert os.listdir(tmp_path) == ["c.safetensors"] and checkpoint.load(path).iter == 1


def test_remove_stale_temps_removes_only_checkpoint_temps(tmp_path):
    for name in [".ckpt_last.safetensors.abc.tmp", ".ckpt_best.safetensors.x1.tmp", "keep.tmp",
                 "ckpt_last.safetensors", "log.jsonl"]:
        (tmp_path / name).write_text("x")
    removed = checkpoint.remove_stale_temps(tmp_path)
    assert len(removed) == 2
    assert sorted(os.listdir(tmp_path)) == ["ckpt_last.safetensors", "keep.tmp", "log.jsonl"]


@pytest.mark.parametrize("options", [dict(rope=True), dict(norm="rmsnorm", qk_norm=True, activation="relu2"),
                                     dict(rope=True, norm="rmsnorm", bias=True, tie_weights=False)])
def test_every_model_option_round_trips_and_a_bigger_claim_is_still_refused(tmp_path, monkeypatch, options):
    """The header check knows which tensors each option has (rope: no wpe table)."""
    m = GPT(GPTConfig(**CFG, **options))
    path = checkpoint.save(tmp_path / "c.safetensors", m, None, {"iter": 1})
    m2, _, _ = checkpoint.load_model(path)
    for (n, a), (_, b) in zip(m.named_parameters(), m2.named_parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=n)

    def edit(meta):
        meta["model_config"].update(n_embd=1 << 20, n_head=1)
        rehash(meta, path)
    rewrite_meta(path, edit)
    monkeypatch.setattr(models, "model_from_config", never_called)
    with pytest.raises(CheckpointError, match="does not add up"):
        checkpoint.load_model(path)
