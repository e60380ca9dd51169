"""Hub-native checkpoints, offline: a folder laid out as the hub's cache stands in for the hub,
and ``HfApi``'s upload is replaced by a recorder at the boundary."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_base
from test_packaging import absolute_paths

from ktm import KTokenMerging
from ktm.checkpoint import CheckpointError
from ktm.cli.main import main
from ktm.hub import is_hub_id, push_folder

REV = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo_id: str, folder, revision: str = REV, ref: str = "main") -> Path:
    """Copy ``folder`` into ``cache`` as the hub's cache holds repository ``repo_id``:
    ``models--org--name/snapshots/REV/...`` and ``refs/REF`` naming REV."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(folder, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub (and transformers through it) reads, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hub_model(hub_cache, tmp_path):
    """A K = 2 model on the base ``org/tiny-base`` (read from the hub cache), with a random
    LoRA, saved to ``tmp_path/saved``: (model, folder)."""
    put_in_cache(hub_cache, "org/tiny-base", save_tiny_base(tmp_path / "base"))
    m = KTokenMerging.from_base("org/tiny-base", k=2, seed=0, lora_dropout=0.0, encoder_init="paper").eval()
    with torch.no_grad():
        for p in m.trainable_parameters()["lora"]:
            p.normal_(0, 0.2)
    return m, m.save_pretrained(tmp_path / "saved", card={"evaluation": {"metric": "accuracy", "value": 0.75}})


def test_hub_ids_are_org_slash_name_and_never_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert not is_hub_id("runs/a")  # exists here
    for ref in ("./org/name", "/org/name", "a/b/c", "zoo:default-k2", "name", "org/name.gguf", "org/"):
        assert not is_hub_id(ref), ref


def test_round_trip_through_the_hub_cache(hub_model, hub_cache):
    model, folder = hub_model
    put_in_cache(hub_cache, "org/tiny-ktm", folder)
    loaded = KTokenMerging.from_pretrained("org/tiny-ktm").eval()
    prompts, answers = ["hello world, merged", "ab"], ["yes", "no"]
    with torch.no_grad():
        assert torch.equal(model(prompts, answers).loss, loaded(prompts, answers).loss)
    assert loaded.base_reference == "org/tiny-base"
    # a revision names another snapshot; the CLI takes a hub id wherever a folder goes
    put_in_cache(hub_cache, "org/tiny-ktm", folder, revision="f" * 40, ref="v1")
    assert KTokenMerging.from_pretrained("org/tiny-ktm", revision="v1").k == 2
    assert main(["generate", "--checkpoint", "org/tiny-ktm", "--k", "2", "--max-new-tokens", "2",
                 "--device", "cpu", "hello"]) == 0


def test_a_hub_checkpoint_gets_the_same_hash_checks(hub_model, hub_cache):
    _, folder = hub_model
    snap = put_in_cache(hub_cache, "org/tiny-ktm", folder)
    data = bytearray((snap / "encoder.safetensors").read_bytes())
    data[-1] ^= 1
    (snap / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        KTokenMerging.from_pretrained("org/tiny-ktm")


def test_a_hub_id_not_in_the_cache_offline_fails_in_one_line(hub_cache, capsys):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        KTokenMerging.from_pretrained("org/absent")
    assert main(["eval", "--checkpoint", "org/absent", "--task", "tree"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "org/absent" in err


def test_a_saved_folder_has_a_card_and_no_machine_path(hub_model):
    _, folder = hub_model
    assert absolute_paths(folder) == []
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/tiny-base"
    card = (folder / "README.md").read_text()
    head = card.split("---")[1]
    assert "library_name: ktm" in head and 'base_model: "org/tiny-base"' in head and "k: 2" in head
    assert "- prompt-compression" in head
    assert "| value | 0.75 |" in card  # the numbers the caller knows


class Recorder:
    """Stands in for the hub: records what ``HfApi`` would create and upload."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi

        self.repos, self.uploads = [], []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.repos.append((repo_id, kw)))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: self.upload(**kw))

    def upload(self, *, folder_path, repo_id, **kw):
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
        self.uploads.append((repo_id, files, kw))
        return f"https://huggingface.co/{repo_id}/commit/{REV}"


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_exactly_the_saved_folder(hub_model, monkeypatch, capsys):
    model, folder = hub_model
    hub = Recorder(monkeypatch)
    assert main(["push", str(folder), "org/tiny-ktm", "--private"]) == 0
    assert hub.repos == [("org/tiny-ktm", {"private": True, "exist_ok": True, "repo_type": "model"})]
    (repo, files, _), = hub.uploads
    assert repo == "org/tiny-ktm" and files == files_of(folder)
    assert "org/tiny-ktm" in capsys.readouterr().out
    # from Python: the model saves itself and uploads that folder (its card included)
    url = model.push_to_hub("org/tiny-ktm-2")
    assert url.endswith(REV)
    pushed = hub.uploads[-1][1]
    assert set(pushed) == set(files_of(folder)) and pushed["encoder.safetensors"] == files[
        "encoder.safetensors"]


def test_push_asks_for_the_hub_id_of_a_local_base(tmp_path, monkeypatch, make_model, capsys):
    from conftest import trained_checkpoint

    base = save_tiny_base(tmp_path / "base")
    folder = tmp_path / "m"
    trained_checkpoint(folder, base, k=2)
    hub = Recorder(monkeypatch)
    with pytest.raises(CheckpointError, match="local base model"):
        push_folder(folder, "org/x")
    assert main(["push", str(folder), "org/x"]) == 2 and "--base" in capsys.readouterr().err
    push_folder(folder, "org/x", base_reference="org/tiny-base")
    (_, files, _), = hub.uploads
    assert json.loads(files["ktm_config.json"])["base"]["reference"] == "org/tiny-base"
    assert 'base_model: "org/tiny-base"' in files["README.md"].decode()
    assert files["encoder.safetensors"] == (folder / "encoder.safetensors").read_bytes()


def test_an_export_has_a_card_and_no_machine_path(hub_model, tmp_path):
    from ktm.serve.export import export_model

    _, folder = hub_model
    out = export_model(folder, tmp_path / "export")
    assert absolute_paths(out) == []
    card = (out / "README.md").read_text()
    assert 'base_model: "org/tiny-base"' in card and "ktm serve --export" in card


def test_a_local_base_path_is_only_in_ktm_config(tmp_path):
    from conftest import trained_checkpoint

    base = save_tiny_base(tmp_path / "base")
    trained_checkpoint(tmp_path / "m", base, k=2)
    found = absolute_paths(tmp_path / "m")
    assert found and all(f.startswith("ktm_config.json: ") for f in found), found  # the base's reference
    assert not (tmp_path / "m" / "adapter" / "README.md").exists()  # peft's card, which repeated it
    adapter = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "base"
