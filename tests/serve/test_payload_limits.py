"""A served model's ``prompt_embeds`` reader, against crafted payloads: a deflated zip record
that would unpack to far more than the length bound promises, and a torch too old for
``weights_only`` to hold (issue 28 item 3)."""

import base64
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ktm.serve.serving import load_prompt_embeds, tensor_to_base64

SRC = str(Path(__file__).resolve().parents[2] / "src")


def deflated(tensor):
    """``torch.save(tensor)`` with every zip record re-packed deflated: zeros shrink ~750 times."""
    raw, out = io.BytesIO(), io.BytesIO()
    torch.save(tensor, raw)
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return base64.b64encode(out.getvalue()).decode()


MEASURE = """
import resource, sys
from ktm.serve.serving import load_prompt_embeds
payload = open(sys.argv[1]).read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_prompt_embeds(payload, 32, 128, max_chars=len(payload))
except ValueError as e:
    print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_small_deflated_payload_is_refused_before_it_unpacks(tmp_path):
    # 128 MiB of zeros in about 170 KB of base64; the length bound given promises ~130 KB
    payload = deflated(torch.zeros(2 ** 20, 32))
    assert len(payload) < 200_000
    (tmp_path / "payload.txt").write_text(payload)
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "payload.txt")], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert "unpacks to 134,217,939 bytes" in out[0] and "(its zip records' declared sizes), more than the" in out[0]
    assert out[0].endswith("bytes its length bound allows: refused unread")
    assert int(out[1]) < 32  # MiB of peak memory growth (it was 129: the whole tensor was allocated)


def test_a_normal_payload_still_loads_and_an_old_torch_is_refused(monkeypatch):
    good = torch.randn(4, 32)
    assert torch.equal(load_prompt_embeds(tensor_to_base64(good), 32, 8), good)
    assert torch.equal(load_prompt_embeds(deflated(good), 32, 8), good)  # deflated but small: fine
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(RuntimeError, match=r"torch 2.5.1\+cu124 runs code from a crafted file despite "
                                           r"weights_only=True \(CVE-2025-32434\): reading prompt_embeds needs "
                                           r"torch >= 2.6; upgrade torch"):
        load_prompt_embeds(tensor_to_base64(good), 32, 8)
