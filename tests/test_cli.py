"""The `tinygpt` command: train and sample end to end, and bad input -> one line on stderr, exit 2."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinygpt import backend, checkpoint, data
from tinygpt.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
        "--eval-iters", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    # --data shakespeare-download fails at once instead of reaching the network
    monkeypatch.setenv("TINYGPT_SHAKESPEARE_URL", (tmp_path / "no-such-file.txt").as_uri())


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "corpus.txt"
    path.write_text("".join(rng.choice(["to be ", "or not ", "that is ", "the question\n"], 2000)),
                    encoding="utf-8")
    return path


@pytest.fixture
def trained(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out-dir", str(out), "--max-iters", "6",
                 "--eval-interval", "3", *TINY]) == 0
    capsys.readouterr()
    return out


def one_line_error(capsys, rc, match):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


def test_train_then_sample(trained, capsys):
    assert sorted(p.name for p in trained.iterdir()) >= ["ckpt_best.safetensors", "ckpt_last.safetensors",
                                                         "log.jsonl"]
    assert main(["sample", "--out-dir", str(trained), "--prompt", "to be", "--max-new-tokens", "40",
                 "--seed", "3"]) == 0
    a = capsys.readouterr().out
    assert a.startswith("to be") and len(a) == len("to be") + 40 + 1        # + the final newline
    main(["sample", "--out-dir", str(trained), "--prompt", "to be", "--max-new-tokens", "40", "--seed", "3"])
    assert capsys.readouterr().out == a                                     # same seed, same text
    main(["sample", "--out-dir", str(trained), "--prompt", "to be", "--max-new-tokens", "40", "--seed", "4"])
    assert capsys.readouterr().out != a
    main(["sample", "--out-dir", str(trained), "--num-samples", "2", "--max-new-tokens", "5", "--top-k", "3",
          "--temperature", "0.8"])
    assert capsys.readouterr().out.count("---------------") == 1


def test_resume_continues_and_train_output_format(trained, capsys):
    assert main(["train", "--resume", "--out-dir", str(trained), "--max-iters", "9", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming at iteration 6" in out
    assert "step 9: train loss " in out and "step 6:" not in out
    assert checkpoint.load(trained / checkpoint.LAST).iter == 9


def test_default_train_is_packaged_shakespeare_without_network(tmp_path, capsys, monkeypatch, no_network):
    """`tinygpt train` with no data option trains on the Tiny Shakespeare shipped in the package."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max-iters", "0", "--no-progress", "--eval-iters", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""                                                # no fallback notice
    assert "preset speedrun, corpus shakespeare, char tokenizer (vocab 65)" in captured.out
    assert (tmp_path / "out" / checkpoint.LAST).is_file()
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()         # nothing downloaded


def test_shakespeare_download_option(tmp_path, capsys, monkeypatch):
    one_line_error(capsys, main(["train", "--data", "shakespeare-download", "--out-dir", str(tmp_path / "a"),
                                 *TINY]), "could not download Tiny Shakespeare")   # the URL is a missing file
    source = tmp_path / "input.txt"
    source.write_text(data.shakespeare_text(), encoding="utf-8")
    monkeypatch.setenv("TINYGPT_SHAKESPEARE_URL", source.as_uri())
    assert main(["train", "--data", "shakespeare-download", "--out-dir", str(tmp_path / "b"), "--max-iters", "0",
                 *TINY]) == 0
    assert "corpus shakespeare-download, char tokenizer (vocab 65)" in capsys.readouterr().out
    assert (tmp_path / "cache" / "tinyshakespeare.txt").read_bytes() == source.read_bytes()


def test_bad_data_inputs(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, main(["train", "--data", str(tmp_path / "missing.txt")]), "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    one_line_error(capsys, main(["train", "--data", str(bad)]), "not valid UTF-8")
    short = tmp_path / "short.txt"
    short.write_text("hello world, this is short")
    one_line_error(capsys, main(["train", "--data", str(short), *TINY[:-1], "--block-size", "8"]), "too short")
    assert not (tmp_path / "out").exists()


def test_bad_config_inputs(corpus, capsys, tmp_path):
    one_line_error(capsys, main(["train", "--preset", "gpt5", "--data", str(corpus)]), "bigram, cpu, video")
    one_line_error(capsys, main(["train", "--n-embd", "30", "--n-head", "4", "--data", str(corpus)]),
                   "n_embd=30 is not divisible by n_head=4")
    one_line_error(capsys, main(["train", "--max-iters", "many"]), "invalid int value")
    one_line_error(capsys, main(["train", "--tokenizer", "words", "--data", str(corpus)]), "tokenizer")


@pytest.mark.skipif(backend.is_cuda_available(), reason="CUDA is available here")
def test_cuda_without_cupy_or_gpu(corpus, capsys, tmp_path):
    one_line_error(capsys, main(["train", "--device", "cuda", "--data", str(corpus),
                                 "--out-dir", str(tmp_path / "o")]), "cuda")
    assert not (tmp_path / "o").exists()


def test_bad_checkpoints(trained, tmp_path, capsys):
    one_line_error(capsys, main(["sample", "--out-dir", str(tmp_path / "nowhere")]), "no checkpoint")
    one_line_error(capsys, main(["train", "--resume", "--out-dir", str(tmp_path / "nowhere")]), "nothing to resume")
    broken = tmp_path / "broken"
    broken.mkdir()
    raw = (trained / checkpoint.LAST).read_bytes()
    (broken / checkpoint.LAST).write_bytes(raw[: len(raw) // 3])
    one_line_error(capsys, main(["sample", "--out-dir", str(broken)]), "corrupt or truncated")
    one_line_error(capsys, main(["train", "--resume", "--out-dir", str(broken)]), "corrupt or truncated")


def test_bad_input_never_touches_an_existing_run(trained, corpus, capsys):
    files = {p.name: p.read_bytes() for p in trained.iterdir()}
    one_line_error(capsys, main(["train", "--data", str(corpus), "--out-dir", str(trained), *TINY]), "--resume")
    one_line_error(capsys, main(["train", "--resume", "--out-dir", str(trained), "--n-layer", "3"]),
                   "cannot change n_layer")
    one_line_error(capsys, main(["train", "--resume", "--out-dir", str(trained), "--preset", "video"]),
                   "cannot change preset")
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == files


def test_prompt_outside_the_vocabulary(trained, capsys):
    one_line_error(capsys, main(["sample", "--out-dir", str(trained), "--prompt", "Zebra"]), "'Z'")
    one_line_error(capsys, main(["sample", "--out-dir", str(trained), "--top-p", "1.5"]), "top-p")


def test_bench_is_a_subcommand(capsys):
    one_line_error(capsys, main(["bench", "--preset", "gpt5"]), "gpt5")


def _cli():
    exe = shutil.which("tinygpt")
    return [exe] if exe else [sys.executable, "-m", "tinygpt"]


def _env(tmp_path):
    env = dict(os.environ, TINYGPT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    env["TINYGPT_SHAKESPEARE_URL"] = (tmp_path / "no-such-file.txt").as_uri()
    return env


def test_console_script_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run(_cli() + ["train", "--data", str(tmp_path / "missing.txt")], capture_output=True,
                       text=True, env=_env(tmp_path), timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("tinygpt: error: ") and "Traceback" not in r.stderr


def test_ctrl_c_saves_then_resume_continues(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tinygpt", "train", "--data", str(corpus), "--out-dir", str(out),
           "--max-iters", "1000000", "--eval-interval", "5", *TINY]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                         cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "log.jsonl").exists():
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr.strip().splitlines()[-1]
    saved = checkpoint.load(out / checkpoint.LAST).iter
    assert saved > 0
    r = subprocess.run(cmd[:-len(TINY)] + ["--resume", "--no-progress"] + ["--max-iters", str(saved + 2)],
                       capture_output=True, text=True, env=_env(tmp_path), cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(out / checkpoint.LAST).iter == saved + 2


def test_bpe_tokenizer_run_samples_text(corpus, tmp_path, capsys):
    out = tmp_path / "bpe"
    assert main(["train", "--data", str(corpus), "--tokenizer", "bpe", "--bpe-vocab-size", "300",
                 "--out-dir", str(out), "--max-iters", "2", *TINY]) == 0
    assert "bpe tokenizer (vocab 2" in capsys.readouterr().out          # 256 bytes + what merges it found
    assert main(["sample", "--out-dir", str(out), "--prompt", "to be", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("to be")
