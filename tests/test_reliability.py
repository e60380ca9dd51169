"""Reliability and security: no code from model folders, clear errors for user mistakes."""

import builtins
import errno
import io
import json
import math
import sys

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from ktm import KTokenMerging
from ktm.cli import main

EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint ran code")
from transformers import {base}
class {name}({base}):
    pass
"""


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tok = char_tokenizer()
    d = tmp_path_factory.mktemp("base")
    tiny_llama(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def checkpoint(base_dir, tmp_path_factory):
    """A K = 2 checkpoint saved from the local base folder."""
    path = tmp_path_factory.mktemp("ck") / "model"
    KTokenMerging.from_base(str(base_dir), k=2, seed=0).save_pretrained(path)
    return path


@pytest.fixture
def no_stdin_prompt(monkeypatch):
    """stdin holds what `ktm generate` would read (a "yes" to any question); input() records
    every question and answers yes, so a prompt for custom code would run that code."""
    asked = []

    def fake_input(question=""):
        asked.append(question)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\nwhat is 2+2?\n"))
    monkeypatch.delenv("KTM_TRUST_REMOTE_CODE", raising=False)
    return asked


def _evil_tokenizer(folder, marker):
    """Point the tokenizer in ``folder`` at a Python file beside it that writes ``marker``."""
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    cfg_file.write_text(json.dumps(cfg))
    (folder / "evil_tokenizer.py").write_text(
        EVIL_CODE.format(marker=str(marker), base="PreTrainedTokenizerFast", name="EvilTokenizer"))


def _evil_checkpoint(checkpoint, tmp_path, marker):
    import shutil

    ck = tmp_path / "evil"
    shutil.copytree(checkpoint, ck)
    _evil_tokenizer(ck / "tokenizer", marker)
    return ck


# ---------------------------------------------------------------- 1. no code from model folders
def test_a_checkpoint_tokenizer_with_custom_code_never_runs_it(checkpoint, base_dir, tmp_path, no_stdin_prompt):
    marker = tmp_path / "MARKER"
    ck = _evil_checkpoint(checkpoint, tmp_path, marker)
    with pytest.raises(ValueError, match="needs to run Python code.*--trust-remote-code"):
        KTokenMerging.from_pretrained(ck)
    assert not marker.exists() and no_stdin_prompt == []


def test_ktm_generate_on_an_evil_checkpoint_reads_no_answer_from_stdin(checkpoint, tmp_path, capsys,
                                                                      no_stdin_prompt):
    marker = tmp_path / "MARKER"
    ck = _evil_checkpoint(checkpoint, tmp_path, marker)
    assert main(["generate", "--checkpoint", str(ck), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ktm")]
    assert len(err) == 1  # (the tokenizer is loaded first: it fails before the base is named)
    assert err[0].startswith(f"ktm: error: the tokenizer at {ck / 'tokenizer'} needs to run Python code")
    assert not marker.exists() and no_stdin_prompt == []


def test_a_base_folder_with_custom_model_code_loads_without_it(base_dir, tmp_path, no_stdin_prompt):
    import shutil

    from transformers import LlamaForCausalLM

    marker = tmp_path / "MARKER"
    folder = tmp_path / "evil-base"
    shutil.copytree(base_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil_model.py").write_text(
        EVIL_CODE.format(marker=str(marker), base="LlamaForCausalLM", name="EvilModel"))
    _evil_tokenizer(folder, marker)
    with pytest.raises(ValueError, match="needs to run Python code"):  # the tokenizer needs its code
        KTokenMerging.from_base(str(folder), k=2)
    m = KTokenMerging.from_base(str(folder), k=2, tokenizer=char_tokenizer())  # the model does not
    assert type(m.lm.get_base_model()) is LlamaForCausalLM
    assert not marker.exists() and no_stdin_prompt == []


def test_every_from_pretrained_passes_trust_remote_code_explicitly(checkpoint, base_dir, monkeypatch):
    import transformers

    calls = []

    def spy(cls):
        original = cls.from_pretrained

        def from_pretrained(*args, **kw):
            calls.append((cls.__name__, kw.get("trust_remote_code", "missing")))
            return original(*args, **kw)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        spy(cls)
    monkeypatch.delenv("KTM_TRUST_REMOTE_CODE", raising=False)
    KTokenMerging.from_pretrained(checkpoint)
    KTokenMerging.from_base(str(base_dir), k=1)
    assert {"AutoTokenizer", "AutoModelForCausalLM"} <= {name for name, _ in calls}  # (+ transformers' own)
    assert all(value is False for _, value in calls), calls
    calls.clear()
    KTokenMerging.from_base(str(base_dir), k=1, trust_remote_code=True)  # the opt-in reaches transformers
    assert calls and all(value is True for _, value in calls), calls


def test_trust_remote_code_is_opt_in_only():
    from ktm.cli import build_parser
    from ktm.loading import trust_remote_code_setting

    assert trust_remote_code_setting() is False and trust_remote_code_setting(True) is True
    p = build_parser()
    for cmd in (["generate"], ["eval", "--checkpoint", "x"], ["train", "--out", "x"], ["demo"]):
        assert p.parse_args(cmd).trust_remote_code is False
        assert p.parse_args([*cmd, "--trust-remote-code"]).trust_remote_code is True


# ---------------------------------------------------------------- 2. which base a checkpoint loads
def test_loading_a_checkpoint_says_which_base_it_loads(checkpoint, base_dir, capsys):
    KTokenMerging.from_pretrained(checkpoint)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ktm")]  # (no progress bars)
    assert err == [f"ktm: loading the base model of checkpoint {checkpoint}: local folder {base_dir}"]
    KTokenMerging.from_pretrained(checkpoint, base=str(base_dir))  # the user named the base: no line
    assert "ktm:" not in capsys.readouterr().err


def test_describe_base_names_every_kind_of_source(tmp_path, monkeypatch):
    from ktm.loading import describe_base

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.delenv("KTM_BASE_MODEL", raising=False)
    monkeypatch.setenv("KTM_SMOLLM2_GGUF", str(gguf))
    assert describe_base(str(gguf)) == f"GGUF file {gguf}"
    assert describe_base("default").startswith("the embedded default") and str(gguf) in describe_base(None)
    assert describe_base("HuggingFaceTB/SmolLM2-135M").startswith("hub id 'HuggingFaceTB/SmolLM2-135M' (downloaded")
    monkeypatch.setenv("KTM_BASE_MODEL", "org/name")
    assert "KTM_BASE_MODEL=org/name: hub id 'org/name'" in describe_base("default")


# ---------------------------------------------------------------- 3. local references
def test_a_relative_model_path_is_saved_absolute(base_dir, tmp_path, monkeypatch):
    import shutil

    work = tmp_path / "work"
    shutil.copytree(base_dir, work / "models" / "base")
    monkeypatch.chdir(work)
    m = KTokenMerging.from_base("./models/base", k=2)
    m.save_pretrained("ck")
    saved = json.loads((work / "ck" / "ktm_config.json").read_text())["base"]["reference"]
    assert saved == str(work / "models" / "base")
    monkeypatch.chdir(tmp_path)  # another folder: the checkpoint still finds its base
    assert KTokenMerging.from_pretrained(work / "ck").base_fingerprint == m.base_fingerprint


@pytest.mark.parametrize("ref", ["./missing", "/no/such/model", "~/no-such-ktm-model", "runs/k4/model",
                                 "missing.gguf", "org/name.GGUF"])
def test_a_missing_local_path_is_not_sent_to_the_hub(ref, capsys):
    from ktm.loading import locate_base

    with pytest.raises(FileNotFoundError, match=f"^no such model folder or file: {ref}$"):
        KTokenMerging.from_base(ref, k=2)
    assert main(["generate", "--model", ref, "--device", "cpu", "hello"]) == 2
    assert capsys.readouterr().err == f"ktm: error: no such model folder or file: {ref}\n"
    assert locate_base("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    assert locate_base("gpt2") == ("hub", "gpt2")


# ---------------------------------------------------------------- 4. one-line errors in the CLI
@pytest.mark.parametrize("exc, expected", [
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out/train.jsonl"),
     "ktm: error: permission denied: /ro/out/train.jsonl: choose a file or folder you can write to"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/out/train.jsonl"),
     "ktm: error: no space left on the device writing /full/out/train.jsonl: free some space"),
    (OSError(errno.EIO, "Input/output error"), "ktm: error: [Errno 5] Input/output error (check the paths"),
])
def test_os_errors_are_one_line(exc, expected, monkeypatch, tmp_path, capsys):
    import ktm.tasks.tree

    def fail(*a, **kw):
        raise exc

    monkeypatch.setattr(ktm.tasks.tree, "write_stage", fail)
    assert main(["data", "tree", "--num-trees", "5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1


def test_safetensors_and_checkpoint_errors_are_one_line(monkeypatch, tmp_path, capsys):
    import ktm.tasks.tree
    from safetensors import SafetensorError

    def fail(*a, **kw):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(ktm.tasks.tree, "write_stage", fail)
    assert main(["data", "tree", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ktm: error: a .safetensors file could not be read or written (Error while "
                          "deserializing header: HeaderTooLarge): it is corrupt or incomplete; re-save")
    assert err.count("\n") == 1
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == (f"ktm: error: no ktm checkpoint folder at {tmp_path / 'nope'} (--checkpoint must be a "
                   f"folder written by ktm train, e.g. OUT/model, used with the base model it was trained on)\n")


def test_a_real_bug_keeps_its_traceback(monkeypatch, tmp_path):
    import ktm.tasks.tree

    def bug(*a, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(ktm.tasks.tree, "write_stage", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["data", "tree", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["eval", "--checkpoint", "x", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["generate", "--k", "0", "hi"], "argument --k: must be >= 1, got 0"),
    (["generate", "--max-new-tokens", "0", "hi"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["demo", "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["train", "--out", "x", "--steps", "-1"], "steps must be >= 1, got -1"),
    (["train", "--out", "x", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["generate", "--top-p", "1.5", "--sample", "hi"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["generate", "--top-p", "nan", "--sample", "hi"], "argument --top-p: must be in (0, 1], got nan"),
    (["generate", "--temperature", "0", "--sample", "hi"], "argument --temperature: must be a finite number > 0"),
    (["generate", "--top-k", "0", "--sample", "hi"], "argument --top-k: must be >= 1, got 0"),
    (["data", "tree", "--num-trees", "0", "--out", "x"], "argument --num-trees: must be >= 1, got 0"),
])
def test_out_of_range_arguments_are_rejected_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(message) or message in err.strip().splitlines()[-1]


# ---------------------------------------------------------------- 5. encoder size guard
def test_an_encoder_too_large_for_memory_is_refused_before_allocation(monkeypatch, make_model):
    import ktm.model.encoder
    from ktm.model.encoder import build_encoder, encoder_parameters

    with pytest.raises(ValueError, match=r"K = 64 on d = 576 .*\(15\.\d GiB in float32\).*--encoder-hidden"):
        build_encoder(64, 576)  # the real case: refused from the arithmetic alone
    monkeypatch.setattr(ktm.model.encoder, "MAX_ENCODER_BYTES", 2**20)  # 1 MiB
    assert 4 * encoder_parameters(16, 32) > 2**20
    with pytest.raises(ValueError, match=r"more than the 0\.0009765\d* GiB limit .*encoder_hidden \(--encoder-hidden\), "
                                         r"at most about \d+"):
        make_model(k=16)
    m = make_model(k=16, encoder_hidden=64)
    assert sum(p.numel() for p in m.encoder.parameters()) * 4 <= 2**20


def test_the_suggested_encoder_hidden_fits(monkeypatch):
    import re

    import ktm.model.encoder
    from ktm.model.encoder import build_encoder

    monkeypatch.setattr(ktm.model.encoder, "MAX_ENCODER_BYTES", 2**18)
    for stages in (None, (4, 4)):
        with pytest.raises(ValueError) as e:
            build_encoder(16, 32, stages=stages)
        fit = int(re.search(r"at most about (\d+)", str(e.value)).group(1))
        enc = build_encoder(16, 32, hidden=fit, stages=stages)
        assert sum(p.numel() for p in enc.parameters()) * 4 <= 2**18


# ---------------------------------------------------------------- 6. generation options
@pytest.mark.parametrize("kw, message", [
    (dict(do_sample=True, top_p=0.0), "top_p must be in (0, 1]"),
    (dict(do_sample=True, top_p=1.5), "top_p must be in (0, 1]"),
    (dict(do_sample=True, top_p=math.nan), "top_p must be in (0, 1]"),
    (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
    (dict(do_sample=True, temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(do_sample=True, temperature=math.inf), "temperature must be a finite number > 0"),
    (dict(do_sample=True, temperature=math.nan), "temperature must be a finite number > 0"),
    (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=0.7), "temperature=0.7 only apply when sampling"),
    (dict(top_k=5), "top_k=5 only apply when sampling"),
    (dict(top_p=0.9, temperature=0.5), "temperature=0.5, top_p=0.9 only apply when sampling"),
])
def test_generate_rejects_bad_or_ignored_sampling_options(make_model, kw, message):
    m = make_model(k=2)
    with pytest.raises(ValueError) as e:
        m.generate(["abc"], max_new_tokens=2, **kw)
    assert message in str(e.value)
    if "only apply" in message:
        assert "do_sample=True (ktm generate: --sample)" in str(e.value)


def test_generate_still_samples_and_decodes_greedily(make_model):
    m = make_model(k=2)
    gen = torch.Generator().manual_seed(0)
    assert len(m.generate(["abc"], max_new_tokens=2, do_sample=True, temperature=0.5, top_k=1, top_p=1.0,
                          generator=gen)) == 1
    assert m.generate(["abc"], max_new_tokens=2, do_sample=True, top_k=1, generator=gen) == \
        m.generate(["abc"], max_new_tokens=2)  # top-k 1 sampling is greedy


def test_cli_generate_checks_sampling_options_and_k(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--temperature", "0.7", "hi"]) == 2
    assert capsys.readouterr().err == ("ktm: error: temperature=0.7 only apply when sampling, and decoding is "
                                       "greedy: pass do_sample=True (ktm generate: --sample), or leave them out\n")
    assert main(["generate", "--checkpoint", str(checkpoint), "--k", "4", "hi"]) == 2
    assert capsys.readouterr().err == (f"ktm: error: --k 4 does not match --checkpoint {checkpoint}, which was "
                                       f"trained for K = 2 (the checkpoint fixes K): leave --k out\n")
    assert main(["generate", "--checkpoint", str(checkpoint), "--k", "2", "--device", "cpu",
                 "--max-new-tokens", "2", "--json", "abcd"]) == 0
    assert json.loads(capsys.readouterr().out)["merged_length"] == 2
