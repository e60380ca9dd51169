"""Pretrained mergers that ship with ktm (ktm.train.zoo): slim copies, zoo:NAME references, the build."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import write_texts

from ktm import KTokenMerging, checkpoint
from ktm.checkpoint import CheckpointError, read_config, resolve_folder
from ktm.cli import main
from ktm.train.zoo import CARD_NAME, ZOO, ZooEntry, build, describe_shipped, file_sha256, write_slim

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "the cat sat on a mat and then ran"


def trained(base_dir, seed=0):
    """A K = 2 model with random (not initial) LoRA and encoder weights."""
    m = KTokenMerging.from_base(base_dir, k=2, encoder_hidden=16, seed=seed, lora_dropout=0.0,
                                device="cpu", dtype="float32").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for group in m.trainable_parameters().values():
            for p in group:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return m


def trainable_state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items() if "lora_" in k or k.startswith("encoder.")}


def test_a_slim_copy_holds_the_weights_rounded_to_bf16(base_dir, tmp_path):
    m = trained(base_dir)
    full = m.save_pretrained(tmp_path / "full")
    slim = write_slim(full, tmp_path / "slim")
    meta = read_config(slim)
    assert meta["weights_dtype"] == "bfloat16" and meta["model"] == read_config(full)["model"]
    assert not (slim / "tokenizer").exists() and not (slim / CARD_NAME).exists()
    for name in ("encoder.safetensors", "adapter/adapter_model.safetensors"):
        tensors = load_file(slim / name)
        assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
        assert (slim / name).stat().st_size < 0.6 * (full / name).stat().st_size
    # loaded into a float32 model: exactly the rounded weights, and nearly the same function
    again = KTokenMerging.from_pretrained(slim, device="cpu", dtype="float32").eval()
    want, got = trainable_state(m), trainable_state(again)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k].to(torch.bfloat16).float()), k
    with torch.no_grad():
        a, b = m([PROMPT], ["sat"]).logits, again([PROMPT], ["sat"]).logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    # a corrupt source is refused, nothing is written
    (full / "encoder.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="corrupt"):
        write_slim(full, tmp_path / "slim2")
    assert not (tmp_path / "slim2").exists()
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_slim(slim, tmp_path / "slim3", dtype="int8")


def test_zoo_names_resolve_to_the_shipped_folders(base_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "MERGERS_DIR", tmp_path / "mergers")
    assert main(["zoo", "list"]) == 0
    assert "no mergers ship" in capsys.readouterr().out
    m = trained(base_dir)
    write_slim(m.save_pretrained(tmp_path / "full"), tmp_path / "mergers" / "tiny-k2")
    assert resolve_folder("zoo:tiny-k2") == tmp_path / "mergers" / "tiny-k2"
    assert resolve_folder(tmp_path / "full") == tmp_path / "full"
    with pytest.raises(CheckpointError, match=r"no merger 'nope' ships with ktm \(shipped: zoo:tiny-k2"):
        resolve_folder("zoo:nope")
    loaded = KTokenMerging.from_pretrained("zoo:tiny-k2", device="cpu", dtype="float32")
    assert loaded.k == 2 and loaded.encoder.hidden == 16
    rows = describe_shipped()
    assert [(r["name"], r["k"], r["weights_dtype"]) for r in rows] == [("tiny-k2", 2, "bfloat16")]
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "zoo:tiny-k2  K = 2" in out and "bfloat16" in out and "--init-from zoo:tiny-k2 --k 2" in out
    assert main(["generate", "--checkpoint", "zoo:nope", "x"]) == 2
    assert "no merger 'nope' ships with ktm" in capsys.readouterr().err


def tiny_entry(text, base_dir, steps=4):
    return ZooEntry(name="tiny-k2", summary="a test merger", base=str(base_dir),
                    model=dict(k=2, encoder_hidden=16, lora_dropout=0.0),
                    train=dict(steps=steps, batch_size=4, eval_examples=4, eval_every=2, lr=1e-2, warmup_steps=0),
                    text=dict(text=(str(text),), text_field=("text", "new_contents"), prompt_tokens=24,
                              continuation_tokens=8, min_prompt_tokens=8))


def test_build_pretrains_slims_measures_and_a_task_starts_from_it(base_dir, tmp_path, monkeypatch, capsys):
    text = write_texts(tmp_path / "text")
    entry = tiny_entry(text, base_dir)
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text("".join(json.dumps({"rating": r, "text": f"it is {w}"}) + "\n"
                               for r, w in ((1, "bad"), (5, "good"), (4, "fine"))))
    measured = dict(fidelity_text=str(text / "train.jsonl"), fidelity_reviews=str(reviews), fidelity_windows=3)
    folder, card = build(entry, tmp_path / "run", into=tmp_path / "mergers", device="cpu", log=lambda *a: None,
                         **measured)
    assert folder == tmp_path / "mergers" / "tiny-k2" and not (tmp_path / "run" / "slim").exists()
    fid = card["fidelity"]
    assert fid["windows"] == 3 and fid["perplexity_ratio"] > 0 and 0 <= fid["top1_agreement"] <= 1
    assert fid["amazon"]["reviews"] == 3 and card["tokens_seen"] == 4 * 4 * (24 + 8)
    assert card["text_sha256"] == {"train.jsonl": file_sha256(text / "train.jsonl")} and card["cpu_hours"] >= 0
    assert json.loads((folder / CARD_NAME).read_text()) == card
    readme = (folder / "README.md").read_text()  # the hub's model card, with the numbers the build measured
    assert readme.startswith("---\nlibrary_name: ktm\n") and "\nktm:\n  k: 2\n" in readme
    assert f"| perplexity_ratio | {fid['perplexity_ratio']:.4g} |" in readme
    assert card["k"] == 2 and card["pretrain_steps"] == 4 and card["weights_dtype"] == "bfloat16"
    held = card["held_out"]
    assert 1 <= held["windows"] <= 4 and held["plain_perplexity"] > 1 and held["no_prompt_perplexity"] > 1
    full, slim = held["merged_perplexity_float32"], held["merged_perplexity_bfloat16"]
    assert full > 1 and abs(slim - full) < 0.05 * full
    assert card["command"] == "ktm zoo build tiny-k2 --out RUN"  # no path of the machine that built it
    assert card["settings"]["model"]["encoder_hidden"] == 16 and card["bytes"] > 0
    # the slim folder holds the pretrained run's weights, rounded
    run_model = KTokenMerging.from_pretrained(tmp_path / "run" / "model", device="cpu", dtype="float32")
    shipped = KTokenMerging.from_pretrained(folder, device="cpu", dtype="float32")
    want, got = trainable_state(run_model), trainable_state(shipped)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16).float()) for k in want)
    # building again from the finished run (--resume) trains nothing more: the same files
    before = read_config(folder)["files"]
    build(entry, tmp_path / "run", into=tmp_path / "mergers", device="cpu", resume=True, log=lambda *a: None,
          **measured)
    assert read_config(folder)["files"] == before
    # a task starts from it by name
    monkeypatch.setattr(checkpoint, "MERGERS_DIR", tmp_path / "mergers")
    data = tmp_path / "task"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"the {w} sat, Label:", "answer": w}) + "\n" for w in ("cat", "dog", "fish")))
    args = ["train", "--task", "jsonl", "--data", str(data), "--model", str(base_dir), "--k", "2", "--steps", "1",
            "--batch-size", "2", "--eval-examples", "2", "--device", "cpu", "--dtype", "float32"]
    assert main(args + ["--init-from", "zoo:tiny-k2", "--out", str(tmp_path / "task")]) == 0
    assert main(args + ["--init-from", "zoo:tiny-k2", "--k", "4", "--out", str(tmp_path / "task4")]) == 2
    assert "k = 4 (the saved model has 2)" in capsys.readouterr().err


def test_build_refuses_missing_text_and_unknown_names(tmp_path, capsys):
    assert main(["zoo", "build", "default-k2", "--out", str(tmp_path / "r"), "--text", str(tmp_path / "no.jsonl")]) == 2
    assert "pretraining text not found" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["zoo", "build", "nope", "--out", str(tmp_path / "r")]) == 2


def test_the_recorded_entries_build_what_ships():
    """Each entry's settings are valid, and a merger that ships was built from its entry."""
    from ktm.train.pretrain import pretrain_configs
    from ktm.tasks.text import TextOptions

    for entry in ZOO.values():
        model_cfg, train_cfg = pretrain_configs(entry.recipe, entry.model, entry.train)
        TextOptions(**entry.text)
        if entry.name in checkpoint.shipped_mergers():
            meta = read_config(f"zoo:{entry.name}")
            saved = meta["model"]
            assert saved["k"] == model_cfg.k and saved["encoder_hidden"] == model_cfg.encoder_hidden
            assert saved["lora_r"] == model_cfg.lora_r and meta["weights_dtype"] == entry.save_dtype
            card = json.loads((resolve_folder(f"zoo:{entry.name}") / CARD_NAME).read_text())
            recorded = json.loads(json.dumps(entry.train))
            changed = {k: v for k, v in card["settings"]["train"].items() if recorded.get(k) != v}
            # what a build changed (a GPU's batch) is an option of the command that rebuilds it
            assert set(changed) <= {"batch_size", "grad_accum", "save_every", "eval_every", "max_minutes", "cooldown"}
            assert all(f" --{k.replace('_', '-')} {v}" in card["command"] for k, v in changed.items())
            assert 0 < card["pretrain_steps"] <= train_cfg.steps  # a long run ships in pieces
            assert set(card["text_sha256"]) == {Path(t).name for t in entry.text["text"]}


# ---------------------------------------------------------------- what ships (embedded model)
TEXTS = [
    "I bought these running shoes for my daughter and she loves them. They fit true to size, the "
    "cushioning is soft and they still look new after three months of daily use at school and at practice. "
    "The laces are a bit long but that is easy to fix. I would buy them again without a second thought.",
    "def read_config(path):\n    \"\"\"Read the JSON config of a run folder and check its keys.\"\"\"\n"
    "    with open(os.path.join(path, 'config.json')) as f:\n        config = json.load(f)\n"
    "    for key in ('model', 'train', 'seed'):\n        if key not in config:\n"
    "            raise KeyError(f'{path}: config has no {key!r}')\n    return config\n",
    "Terrible quality. The zipper broke the second time I used the bag and the stitching on the strap "
    "came apart within a week. Customer service never answered my emails. Save your money and buy "
    "something else, this is not worth even half of what I paid for it.",
]


@pytest.mark.integration
def test_the_shipped_k2_merger_continues_real_text_far_better_than_block_means(tmp_path):
    from ktm.train.evaluate import evaluate
    from ktm.tasks.text import TextOptions, TextTask

    assert "default-k2" in checkpoint.shipped_mergers()
    card = json.loads((resolve_folder("zoo:default-k2") / CARD_NAME).read_text())
    held = card["held_out"]
    assert held["plain_perplexity"] < held["merged_perplexity_bfloat16"] < held["no_prompt_perplexity"]
    assert card["bytes"] < 10 * 2**20 and card["k"] == 2
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    shipped = KTokenMerging.from_pretrained("zoo:default-k2", device="cpu", dtype="float32")
    opts = TextOptions(text=(str(tmp_path / "t.jsonl"),), prompt_tokens=40, continuation_tokens=12)
    task = TextTask(opts.text, shipped.tokenizer, opts)
    examples = task.examples("train") + task.examples("test")
    assert len(examples) >= 3
    pretrained = evaluate(shipped, task, examples, progress=False)["value"]
    untrained = KTokenMerging.from_base(None, k=2, encoder_hidden=256, device="cpu", dtype="float32")
    block_mean = evaluate(untrained, task, examples, progress=False)["value"]
    assert pretrained < 0.7 * block_mean, (pretrained, block_mean)


def test_the_amazon_demo_points_to_the_shipped_merger(monkeypatch, tmp_path):
    from ktm.experiments.demo import AMAZON_DEMO, shipped_merger_hint

    hint = shipped_merger_hint("../shared/data/amazon", AMAZON_DEMO)
    assert "--k 2 --init-from zoo:default-k2 --lr 0.0003" in hint and f"--steps {AMAZON_DEMO['steps']}" in hint
    assert shipped_merger_hint("x", AMAZON_DEMO, model="some/other-model") is None
    monkeypatch.setattr(checkpoint, "MERGERS_DIR", tmp_path)
    assert shipped_merger_hint("x", AMAZON_DEMO) is None


def test_a_build_without_its_checkpoint_continues_from_the_published_merger(base_dir, tmp_path):
    """A fresh clone has the published slim merger and its card, not the run folder: --resume
    continues from them at the card's step, with the optimiser state restarted."""
    import dataclasses

    text = write_texts(tmp_path / "text")
    entry = tiny_entry(text, base_dir, steps=4)
    quiet = dict(into=tmp_path / "mergers", device="cpu", fidelity_text=None)
    lines = []
    _, first = build(entry, tmp_path / "run1", log=lines.append, **quiet)
    folder, card = build(entry, tmp_path / "run2", resume=True, steps=6, log=lines.append, **quiet)
    assert card["pretrain_steps"] == 6 and card["restarts"] == [4]
    assert [r["step"] for r in card["history"]][:len(first["history"])] == [r["step"] for r in first["history"]]
    assert any("continuing from" in str(x) for x in lines)
    run2 = json.loads((tmp_path / "run2" / "checkpoint" / "trainer_state.json").read_text())
    assert run2["step"] == 6
    # the weights moved on from the published ones
    before = KTokenMerging.from_pretrained(tmp_path / "run1" / "model", device="cpu", dtype="float32")
    after = KTokenMerging.from_pretrained(folder, device="cpu", dtype="float32")
    assert any(not torch.equal(a, b) for a, b in zip(trainable_state(before).values(), trainable_state(after).values()))
    # other settings: no continuation, a run from scratch
    other = dataclasses.replace(entry, train={**entry.train, "lr": 5e-3})
    _, card = build(other, tmp_path / "run3", resume=True, steps=2, log=lines.append, **quiet)
    assert card["pretrain_steps"] == 2 and card["restarts"] == []


def test_training_overrides_are_recorded_and_a_continuation_needs_the_same(base_dir, tmp_path):
    """``zoo build --batch-size 2 --save-every 3``: the card's settings, tokens and command say
    so; continuing from the published merger takes the same batch (the checkpoint interval may
    differ), another batch starts from scratch."""
    text = write_texts(tmp_path / "text")
    entry = tiny_entry(text, base_dir, steps=3)
    quiet = dict(into=tmp_path / "mergers", device="cpu", fidelity_text=None, log=lambda *a: None)
    _, card = build(entry, tmp_path / "run1", train={"batch_size": 2, "save_every": 3}, **quiet)
    assert card["settings"]["train"]["batch_size"] == 2 and card["settings"]["train"]["save_every"] == 3
    assert card["tokens_seen"] == 3 * 2 * (24 + 8)
    assert card["command"] == "ktm zoo build tiny-k2 --out RUN --batch-size 2 --save-every 3"
    _, card = build(entry, tmp_path / "run2", resume=True, steps=4, train={"batch_size": 2}, **quiet)
    assert card["pretrain_steps"] == 4 and card["restarts"] == [3]
    # an annealing last piece (and its evaluation interval) still continues the published merger
    _, card = build(entry, tmp_path / "run2b", resume=True, steps=6, train={"batch_size": 2, "grad_accum": 2,
                                                                           "cooldown": 2, "eval_every": 1}, **quiet)
    assert card["pretrain_steps"] == 6 and card["restarts"] == [3, 4]  # every restart of the run so far
    assert card["command"] == ("ktm zoo build tiny-k2 --out RUN --resume --steps 6 --batch-size 2 --grad-accum 2 "
                               "--cooldown 2 --eval-every 1")
    assert [row["step"] for row in card["history"] if row["step"] > 4] == [5, 6]
    _, card = build(entry, tmp_path / "run3", resume=True, steps=2, **quiet)  # the recorded batch of 4
    assert card["pretrain_steps"] == 2 and card["restarts"] == []


def test_no_shipped_file_names_a_folder_of_the_machine(base_dir, tmp_path):
    """The shipped mergers hold no absolute path (a home, a venv, a run folder); a slim copy names
    its base in peft's adapter config by ktm's base reference, not by where peft loaded it from."""
    from ktm.checkpoint import MERGERS_DIR

    for folder in [p for p in Path(MERGERS_DIR).iterdir() if p.is_dir()]:
        for f in folder.rglob("*.json"):
            text = f.read_text()
            for marker in ("/work/", "/home/", "/root/", "/Users/", "site-packages", "/tmp/", ":\\"):
                assert marker not in text, f"{f} names {marker!r}"
    src = tmp_path / "ckpt"
    KTokenMerging.from_base(base_dir, k=2, encoder_hidden=8).save_pretrained(src)
    slim = write_slim(src, tmp_path / "slim")
    peft_config = json.loads((slim / "adapter" / "adapter_config.json").read_text())
    assert not Path(peft_config["base_model_name_or_path"]).is_absolute()


def test_the_demo_prints_each_shipped_mergers_fidelity(monkeypatch, tmp_path):
    import shutil

    from ktm.experiments.demo import shipped_fidelity_lines

    shutil.copytree(resolve_folder("zoo:default-k2"), tmp_path / "default-k2")
    card_path = tmp_path / "default-k2" / CARD_NAME
    card = json.loads(card_path.read_text())
    card["fidelity"] = {"k": 2, "merged_perplexity": 30.0, "plain_perplexity": 25.0, "perplexity_ratio": 1.2,
                        "top1_agreement": 0.7, "tokens": 3200, "windows": 100, "kl_per_token": 0.3}
    card_path.write_text(json.dumps(card))
    monkeypatch.setattr(checkpoint, "MERGERS_DIR", tmp_path)
    (line,) = shipped_fidelity_lines()
    assert line.startswith("zoo:default-k2 before any task training: K = 2") and "1.200x" in line and "70.0%" in line
    card.pop("fidelity")
    card_path.write_text(json.dumps(card))
    assert shipped_fidelity_lines() == []
