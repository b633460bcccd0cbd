"""Checkpoints: one safetensors file holding the weights, the optimizer moments and a JSON header.

Layout of `ckpt_last.safetensors` / `ckpt_best.safetensors`:

    tensors   "model.<name>"               every unique parameter (a tied weight once, under its first name)
              "optim.<index>.<key>"        optimizer arrays: exp_avg, exp_avg_sq (AdamW), momentum_buffer (SGD)
    metadata  "tinygpt": JSON with         format/version, model config, tokenizer, iteration, best val loss,
                                           RNG states, optimizer steps + param groups, schedule, run settings,
                                           the aliases of tied weights, and "sha256": one digest over
                                           the rest of this JSON and every tensor's name, dtype, shape, bytes

There is no pickle anywhere: safetensors stores raw little-endian arrays and JSON, so loading a checkpoint
cannot run code. Writes are atomic (temporary file in the same folder, fsync, rename, fsync the folder):
a crash leaves either the old file or the new one, never half of one, and a write that fails (a full disk)
is a CheckpointWriteError with the old file untouched and the temporary file gone.

Loading checks the digest (so an edited header is as corrupt as a flipped tensor byte), then checks the
model config in the header against the shapes of the tensors before any model is built (so a header that
claims a model far larger than the file allocates nothing), and the tokenizer against the embedding.
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "tinygpt-checkpoint"
VERSION = 2                 # 2: the digest covers the header too (1: tensors only, still read)
LAST, BEST = "ckpt_last.safetensors", "ckpt_best.safetensors"

__all__ = ["CheckpointError", "CheckpointWriteError", "Checkpoint", "save", "load", "checkpoint_path",
           "find_checkpoint", "load_model", "check_model_config", "check_tokenizer", "remove_stale_temps",
           "LAST", "BEST"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt, or does not fit the model."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (a full disk, an I/O error); the previous file is unchanged.
    Both a CheckpointError and an OSError (`.errno` is set when the cause had one, e.g. ENOSPC)."""


@dataclass
class Checkpoint:
    """What `load` returns: the JSON header and the arrays, split into model weights and optimizer state."""
    meta: dict
    model_state: dict[str, np.ndarray]                 # name -> array, tied weights under every name
    optim_state: dict | None = None                    # optimizer.state_dict() layout, or None
    path: Path | None = field(default=None)

    @property
    def iter(self) -> int:
        """The iteration the run had reached when it was saved (0 when the header has none)."""
        return int(self.meta.get("iter", 0))


def checkpoint_path(out_dir: str | Path, which: str = "last") -> Path:
    """`out_dir/ckpt_last.safetensors` or `out_dir/ckpt_best.safetensors`."""
    if which not in ("last", "best"):
        raise ValueError(f"which must be 'last' or 'best', got {which!r}")
    return Path(out_dir) / (LAST if which == "last" else BEST)


def find_checkpoint(out_dir: str | Path, prefer: str = "best") -> Path:
    """The preferred checkpoint in out_dir if it exists, else the other one; CheckpointError if neither."""
    order = ["best", "last"] if prefer == "best" else ["last", "best"]
    for which in order:
        p = checkpoint_path(out_dir, which)
        if p.is_file():
            return p
    raise CheckpointError(f"no checkpoint in {str(out_dir)!r} (looked for {LAST} and {BEST}); "
                          f"train one with: tinygpt train --out-dir {out_dir}")


def _digest(tensors: dict[str, np.ndarray], header: dict | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in sorted name order, then (version 2) over
    the header's canonical JSON without its "sha256" field."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    if header is not None:
        rest = {k: v for k, v in header.items() if k != "sha256"}
        h.update(b"header;" + json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def _write_error(path: Path, e: BaseException) -> CheckpointWriteError:
    """One line for a failed write; keeps the errno of an OSError, or of a SafetensorError's 'os error N'."""
    msg = " ".join(str(e).split()) or type(e).__name__
    code = getattr(e, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", msg)
        code = int(found.group(1)) if found else None
    hint = "free some disk space, then " if code in (_errno.ENOSPC, _errno.EDQUOT) else "fix that, then "
    err = CheckpointWriteError(f"cannot write checkpoint {str(path)!r} ({msg}); the previous {path.name} "
                               f"is unchanged; {hint}resume with: tinygpt train --resume --out-dir {path.parent}")
    err.errno = code
    return err


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed saves left in `folder` (".ckpt_last.safetensors.*.tmp");
    call it only while no other process can be saving there (tinygpt train holds the out-dir's lock)."""
    return remove_files(tmp for name in (LAST, BEST) for tmp in Path(folder).glob(f".{name}.*.tmp"))


def remove_files(paths: Any) -> list[Path]:
    """Delete each of `paths` that can be deleted (a missing one is fine); the ones deleted."""
    removed = []
    for path in paths:
        try:
            Path(path).unlink()
            removed.append(Path(path))
        except OSError:
            pass
    return removed


def _fsync_dir(path: Path) -> None:
    """Flush the folder's entries to disk, so a rename into it survives a power cut (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return                      # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | Path, model: Any, optimizer: Any = None, meta: dict | None = None) -> Path:
    """Atomically write `model` (and `optimizer`'s state) with JSON `meta` to `path` (a .safetensors file).

    `meta` must be JSON-able; the model's `config_dict()` is added as "model_config" when it has one.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_name:                                   # a tied weight: store it once
            aliases[name] = first_name[id(p)]
            continue
        first_name[id(p)] = name
        tensors[f"model.{name}"] = np.ascontiguousarray(p.numpy())
    header = dict(meta or {})
    if hasattr(model, "config_dict"):
        header.setdefault("model_config", model.config_dict())
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for idx, st in sd["state"].items():
            scalars[str(idx)] = {}
            for key, value in st.items():
                if isinstance(value, np.ndarray):
                    tensors[f"optim.{idx}.{key}"] = np.ascontiguousarray(value)
                else:
                    scalars[str(idx)][key] = value               # "step" counts, None buffers
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                  for g in sd["param_groups"]]
        header["optimizer"] = {"type": type(optimizer).__name__, "state": scalars, "param_groups": groups}
    header.update(format=FORMAT, version=VERSION, aliases=aliases)
    header.pop("tensors_sha256", None)
    try:
        header["sha256"] = _digest(tensors, json.loads(json.dumps(header, allow_nan=False)))
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not plain JSON ({e}); pass numbers, strings, "
                              f"lists and dicts only") from None

    tmp = None
    try:                             # SafetensorError (not an OSError) on a full disk: one error for all
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"tinygpt": text})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                             # mkstemp's 0600 -> the usual mode
        with open(tmp, "rb+") as f:                               # flush the bytes to the disk
            os.fsync(f.fileno())
        os.replace(tmp, path)                                     # atomic on POSIX and Windows
        tmp = None
        _fsync_dir(path.parent)                                   # ... and make the rename durable
    except Exception as e:
        raise _write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by `save`; CheckpointError (one line) if it is missing or damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; train one first "
                              f"(tinygpt train --out-dir {path.parent})")
    try:
        with safe_open(str(path), framework="np") as f:
            raw_meta = (f.metadata() or {}).get("tinygpt")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        msg = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({msg}); "
                              f"delete it or resume from the other checkpoint") from None
    if raw_meta is None:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a tinygpt checkpoint "
                              f"(no 'tinygpt' metadata)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has a corrupt JSON header ({e.msg} at "
                              f"position {e.pos})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a tinygpt checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("version")
    if version not in (1, VERSION):
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version!r}; "
                              f"this tinygpt reads versions 1 and {VERSION}")
    ok = (meta.get("tensors_sha256") == _digest(tensors) if version == 1
          else meta.get("sha256") == _digest(tensors, meta))
    if not ok:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its tensors or header do not match the "
                              f"checksum in its header; delete it or resume from the other checkpoint")

    try:
        model_state, optim_state = _unpack(tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has a malformed header "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    if "model_config" in meta:
        check_model_config(meta["model_config"], model_state, path)
    return Checkpoint(meta=meta, model_state=model_state, optim_state=optim_state, path=path)


def check_model_config(config: Any, model_state: dict, path: Any = None) -> None:
    """Before a model is built from `config` ({"model": "gpt"|"bigram", ...}): the sizes that decide its
    memory (vocab, channels, context, layers) must be those of the tensors in `model_state`, so a header
    that claims a far larger model than the file holds is refused without allocating. CheckpointError."""
    where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} has a malformed model config ({type(config).__name__}, not a dict)")
    kind = config.get("model")
    try:
        if kind == "bigram":
            V = int(config["vocab_size"])
            expect = {"token_embedding_table.weight": (V, V)}
        elif kind == "gpt":
            V, C, T, L = (int(config[k]) for k in ("vocab_size", "n_embd", "block_size", "n_layer"))
            expect = {"transformer.wte.weight": (V, C)}
            if not config.get("rope", False):                    # rope: positions in q, k, no wpe table
                expect["transformer.wpe.weight"] = (T, C)
        else:
            return                                               # model_from_config names the problem
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has a malformed model config ({type(e).__name__}: {e})") from None
    for name, shape in expect.items():
        a = model_state.get(name)
        if a is None or tuple(a.shape) != shape:
            held = "no such tensor" if a is None else f"shape {tuple(a.shape)}"
            raise CheckpointError(f"{where} does not add up: its header describes a {kind} model whose "
                                  f"{name} has shape {shape}, but the file holds {held}; the file is "
                                  f"damaged or was edited")
    if kind == "gpt":
        layers = {k.split(".")[2] for k in model_state if k.startswith("transformer.h.")}
        if layers != {str(i) for i in range(L)}:
            raise CheckpointError(f"{where} does not add up: its header describes {L} transformer blocks, "
                                  f"but the file holds {len(layers)}; the file is damaged or was edited")


def check_tokenizer(tokenizer: Any, config: dict, path: Any = None) -> None:
    """The tokenizer's ids must be exactly the rows of the model's embedding: CheckpointError if not."""
    if tokenizer is None or not isinstance(config, dict) or "vocab_size" not in config:
        return                                       # nothing to compare (check_model_config judges the rest)
    V = config["vocab_size"]
    if tokenizer.vocab_size != V:
        where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
        raise CheckpointError(f"{where} pairs a {tokenizer.kind} tokenizer of {tokenizer.vocab_size} tokens "
                              f"with a model whose embedding has {V} rows; they must agree (the file is "
                              f"damaged, or was assembled from two runs)")


def _unpack(tensors: dict, meta: dict) -> tuple[dict, dict | None]:
    """Split the flat tensor dict into model weights (re-tied) and an optimizer state dict."""
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for alias, target in meta.get("aliases", {}).items():
        if target not in model_state:
            raise KeyError(f"{alias!r} is tied to {target!r}, which the file does not contain")
        model_state[alias] = model_state[target]                  # re-tie: the same array under both names
    if "optimizer" not in meta:
        return model_state, None
    om = meta["optimizer"]
    state: dict[int, dict] = {int(idx): dict(scalars) for idx, scalars in om["state"].items()}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    return model_state, {"state": state, "param_groups": om["param_groups"]}


def load_model(path_or_dir: str | Path, device: Any = None, prefer: str = "best"):
    """(model, tokenizer, checkpoint) from a checkpoint file, or the best (else last) one in a folder."""
    from tinygpt import models, tokenizers

    p = Path(path_or_dir)
    ckpt = load(find_checkpoint(p, prefer) if p.is_dir() else p)
    if "model_config" not in ckpt.meta:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} does not describe a usable model (its header "
                              f"has no model_config)")
    try:
        tok = tokenizers.from_dict(ckpt.meta["tokenizer"]) if "tokenizer" in ckpt.meta else None
    except tokenizers.TokenizerError as e:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} has no usable tokenizer "
                              f"({' '.join(str(e).split())})") from None
    check_tokenizer(tok, ckpt.meta["model_config"], ckpt.path)       # before building anything
    try:
        model = models.model_from_config(ckpt.meta["model_config"])
        model.load_state_dict(ckpt.model_state, strict=True)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} does not describe a usable model "
                              f"({' '.join(str(e).split())})") from None
    if device is not None:
        model.to(device)
    return model, tok, ckpt
