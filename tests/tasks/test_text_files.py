"""``ktm pretrain``'s text files read lazily (issue 28 item 4): a large ``.txt`` file is read
and tokenized only as far as its windows need, a binary one is named, and symbolic links in a
folder are not followed."""

import os
from pathlib import Path

import pytest

from conftest import char_tokenizer
from ktm.tasks.text import TextTask


class Recording:
    """The character tokenizer, recording the longest text it was given."""

    is_fast = True

    def __init__(self):
        self.tokenizer, self.longest = char_tokenizer(), 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kw)


def test_a_large_text_file_is_read_only_as_far_as_its_windows(tmp_path):
    (tmp_path / "book.txt").write_text("the cat sat on the mat.\n" * 400_000)  # 9.6 MB
    tok = Recording()
    task = TextTask([tmp_path / "book.txt"], tok, prompt_tokens=16, continuation_tokens=8, windows_per_text=3)
    examples = task.examples("train") + task.examples("test")
    assert len(examples) == 3 and examples[0].prompt == "the cat sat on t"
    assert tok.longest <= 8192  # it used to tokenize all 9.6 million characters


def test_a_text_file_read_whole_comes_in_pieces(tmp_path):
    (tmp_path / "log.txt").write_text("".join(f"line {i:07d}\n" for i in range(300_000)))  # 3.9 MB
    tok = Recording()
    task = TextTask([tmp_path / "log.txt"], tok, prompt_tokens=64, continuation_tokens=32, windows_per_text=0)
    texts = {e.meta["text"] for e in task.examples("train") + task.examples("test")}
    assert tok.longest <= 1 << 20 and len(texts) == 4
    assert f"{tmp_path / 'log.txt'}:80660" in texts  # the second piece starts at that line


def test_a_binary_file_is_named_and_symlinks_are_not_followed(tmp_path):
    folder, outside = tmp_path / "texts", tmp_path / "secret"
    folder.mkdir()
    outside.mkdir()
    (folder / "a.txt").write_text("a short text of plain words " * 8)
    (outside / "private.txt").write_text("PRIVATE " * 40)
    os.symlink(outside / "private.txt", folder / "link.txt")
    task = TextTask([folder], char_tokenizer(), prompt_tokens=16, continuation_tokens=8)
    assert not any("PRIVATE" in e.prompt + e.answer for e in task.examples("train") + task.examples("test"))
    (folder / "b.txt").write_bytes("plain ".encode() * 3 + b"\x00\x9c\xff binary")
    with pytest.raises(ValueError, match=r"texts/b.txt: not UTF-8 text \(byte 19: b'\\x9c'\)"):
        TextTask([folder], char_tokenizer(), prompt_tokens=16, continuation_tokens=8).examples("train")


@pytest.mark.parametrize("version,passed", [("2.20.0", {"trust_remote_code": False}), ("4.1.0", {})])
def test_a_hub_dataset_is_read_without_running_its_code(monkeypatch, tmp_path, version, passed):
    import sys
    import types

    calls = []
    fake = types.SimpleNamespace(__version__=version,
                                 load_dataset=lambda *a, **kw: calls.append(kw) or iter([{"text": "w " * 60}] * 3))
    monkeypatch.setitem(sys.modules, "datasets", fake)  # the real library is an optional extra
    task = TextTask(["owner/name"], char_tokenizer(), prompt_tokens=16, continuation_tokens=8)
    assert task.examples("train") and calls == [{"split": "train", "streaming": True, **passed}]
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'datasets = ["datasets>=2.20"]' in text
