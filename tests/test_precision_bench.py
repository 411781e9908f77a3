"""bench/precision_gpu.py: a clear exit without a GPU, and a --smoke run that exercises every setting on any device."""
import json

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the script would run the full benchmark")
def test_without_gpu_exits_cleanly(run_py):
    """Without CUDA (and without --smoke) the script explains and exits with status 0, printing nothing on stdout."""
    proc = run_py("bench/precision_gpu.py")
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU found" in proc.stderr and "--smoke" in proc.stderr
    assert proc.stdout == ""


def test_smoke_runs_every_setting(run_py):
    """--smoke trains each precision with and without channels_last, and prints 8 JSON lines and the table."""
    proc = run_py("bench/precision_gpu.py", "--smoke", timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["setting"], r["channels_last"]) for r in rows] == [
        (s, cl) for s in ("fp32", "fp16_scratch", "amp_fp16", "amp_bf16") for cl in (False, True)]
    for r in rows:
        assert r["images_per_s"] > 0 and r["smoke"] is True
        assert r["final_loss"] == r["final_loss"] and r["final_loss"] < 10  # finite, not diverged
        assert r["loss_scale"] == (1.0 if r["setting"] in ("fp32", "amp_bf16") else 2. ** 16 / 2 ** r["skipped_steps"])
    assert "| precision | images/s (NCHW) | images/s (channels_last) |" in proc.stdout
    assert "| AMP BF16 |" in proc.stdout
