"""Hugging Face sources of ``ktm data amazon|commits``: the raw files' schema, the release's
splits, offline use. Everything runs offline: small files in each dataset's exact raw
schema, handed over by a stand-in for ``hf_hub_download`` or laid out as a local Hub cache."""

import json

import pytest

from ktm.cli import main
from ktm.tasks import amazon, commits
from ktm.tasks.amazon import hub_reviews, review_prompt, sentiment
from ktm.tasks.base import read_jsonl, split_by_count
from ktm.tasks.commits import commit_prompt, hub_commits
from ktm.tasks.hub import check_name, is_hub_id

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def review_row(i, product):
    """One line of Amazon-Reviews-2023's raw_review_<Category> file, in its exact schema."""
    return {"rating": float(1 + i % 5), "title": f"title {i}", "text": f" review {i} of {product}<br />ok ",
            "images": [], "asin": f"B{i:09d}", "parent_asin": product, "user_id": f"AE{i % 13:026d}",
            "timestamp": 1588687728923 + i, "helpful_vote": i % 3, "verified_purchase": i % 2 == 0}


def commit_row(i, repo, old_len=20, new_len=20):
    """One line of CommitPackFT's data/<language>/data.jsonl, in its exact schema."""
    return {"commit": f"{i:040x}", "old_file": f"pkg/m{i}.py", "new_file": f"pkg/m{i}.py",
            "old_contents": "o" * old_len, "new_contents": "n" * new_len, "subject": f"Fix bug {i} ",
            "message": f"Fix bug {i}\n\nbody\n", "lang": "Python", "license": "mit", "repos": repo}


def reviews(n=300, products=100):
    # product P{j} has j % 3 + 1 reviews per round, so groups differ in size
    rows, i = [], 0
    while len(rows) < n:
        for j in range(products):
            for _ in range(j % 3 + 1):
                rows.append(review_row(i, f"P{j}"))
                i += 1
    return rows[:n]


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_download(folder):
    """A stand-in for hf_hub_download that serves files under ``folder`` and records calls."""
    calls = []

    def download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(folder / filename)

    download.calls = calls
    return download


def fake_cache(root, repo_id, files):
    """A Hugging Face hub cache holding ``files`` (path -> rows) of a dataset repository."""
    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)  # no newline, as the hub library writes it
    for name, rows in files.items():
        write(repo / "snapshots" / SNAPSHOT / name, rows)
    return root


def test_hub_ids_and_names():
    assert is_hub_id("McAuley-Lab/Amazon-Reviews-2023") and is_hub_id("bigcode/commitpackft")
    assert not is_hub_id("reviews.jsonl") and not is_hub_id("data/reviews.jsonl") and not is_hub_id("a/b/c")
    assert check_name("Amazon_Fashion", "c") == "Amazon_Fashion" and check_name("c++", "l") == "c++"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="must be a plain name"):
            check_name(bad, "the category")


def test_split_by_count_holds_out_whole_groups():
    rows = [(f"f:{i}", {"k": f"g{i % 23}"}) for i in range(500)]
    out = split_by_count(lambda: iter(rows), lambda r: r[1]["k"], 100, 0.25, seed=1)
    test_groups, train_groups = ({r[1]["k"] for r in out[s]} for s in ("test", "train"))
    assert len(out["test"]) <= 100 and not test_groups & train_groups
    groups = {f"g{j}": sum(1 for i in range(500) if i % 23 == j) for j in range(23)}
    assert sum(groups[g] for g in test_groups) == len(out["test"])
    assert len(out["train"]) == round(0.25 * (500 - len(out["test"])))
    assert out == split_by_count(lambda: iter(rows), lambda r: r[1]["k"], 100, 0.25, seed=1)  # fixed
    with pytest.raises(ValueError, match="holds 500 examples, not more than the 500"):
        split_by_count(lambda: iter(rows), lambda r: r[1]["k"], 500)


@pytest.mark.parametrize("test_size,fraction", [(50, 0.1), (120, 0.5), (7, 1.0)])
def test_amazon_release_split_by_product(tmp_path, test_size, fraction):
    rows = reviews(300)
    write(tmp_path / "raw" / "review_categories" / "Amazon_Fashion.jsonl", rows)
    download = fake_download(tmp_path)
    splits, note = hub_reviews(category="Amazon_Fashion", test_size=test_size, train_fraction=fraction,
                               download=download)
    assert download.calls == [("McAuley-Lab/Amazon-Reviews-2023", "raw/review_categories/Amazon_Fashion.jsonl",
                               "dataset")]
    train, test = splits["train"], splits["test"]
    assert len(test) == test_size and len(train) == round(fraction * (300 - test_size))
    assert not {e.meta["parent_asin"] for e in train} & {e.meta["parent_asin"] for e in test}
    assert f"{test_size} reviews of" in note
    by_text = {f" review {i} of {r['parent_asin']}<br />ok ": r for i, r in enumerate(rows)}
    for e in train + test:  # the task's own prompt and label rule, on the stripped text
        row = by_text[f" {e.prompt[len('Review: '):-len(', Label:')]} "]
        assert e.prompt == review_prompt(row["text"].strip()) and e.answer == sentiment(row["rating"])
        assert e.meta["user_id"] == row["user_id"] and "text" not in e.meta


def test_amazon_release_split_follows_the_seed_and_cuts_texts(tmp_path):
    write(tmp_path / "raw" / "review_categories" / "Books.jsonl", reviews(200))
    download = fake_download(tmp_path)
    a, _ = hub_reviews(category="Books", test_size=40, train_fraction=0.3, max_chars=6, download=download)
    b, _ = hub_reviews(category="Books", test_size=40, train_fraction=0.3, seed=1, download=download)
    assert {e.meta["asin"] for e in a["test"]} != {e.meta["asin"] for e in b["test"]}
    assert all(e.prompt == "Review: review, Label:" for e in a["train"])


@pytest.mark.parametrize("field,value,message", [
    ("parent_asin", None, "field 'parent_asin' is missing"),
    ("rating", "five", "field 'rating' must be float, got str five"),
    ("verified_purchase", "yes", "field 'verified_purchase' must be bool"),
    ("timestamp", 1.5, "field 'timestamp' must be int, got float"),
    ("images", None, "field 'images' is missing"),
])
def test_amazon_raw_schema_errors_name_file_line_and_field(tmp_path, field, value, message):
    rows = reviews(5)
    if value is None:
        del rows[2][field]
    else:
        rows[2][field] = value
    write(tmp_path / "raw" / "review_categories" / "Amazon_Fashion.jsonl", rows)
    with pytest.raises(ValueError, match=f"Amazon_Fashion.jsonl:3: {message}"):
        hub_reviews(test_size=1, download=fake_download(tmp_path))


def test_commits_release_split_by_repository_with_the_length_policy(tmp_path):
    rows = [commit_row(i, f"org/r{i % 80}", old_len=20 + 100 * (i % 4 == 0)) for i in range(240)]
    write(tmp_path / "data" / "python" / "data.jsonl", rows)
    download = fake_download(tmp_path)
    splits, report, note = hub_commits(test_size=60, max_chars=100, policy="skip", download=download)
    assert download.calls == [("bigcode/commitpackft", "data/python/data.jsonl", "dataset")]
    assert sum(report["test"].values()) == 60 and sum(report["train"].values()) == 180  # sizes before the policy
    assert report["test"]["skipped"] + report["train"]["skipped"] == 60  # every 4th commit is too long
    assert len(splits["test"]) == report["test"]["kept"] and report["test"]["truncated"] == 0
    train, test = splits["train"], splits["test"]
    assert not {e.meta["repos"] for e in train} & {e.meta["repos"] for e in test}
    e = train[0]
    assert e.prompt == commit_prompt("o" * 20, e.meta["subject"].strip()) and e.answer == "n" * 20
    assert "60 commits of" in note and "old_contents" not in e.meta and e.meta["lang"] == "Python"
    cut, report, _ = hub_commits(test_size=60, max_chars=100, policy="truncate", download=download)
    assert report["train"]["skipped"] == 0 and report["train"]["truncated"] > 0
    assert all(len(e.prompt) == len(commit_prompt("o" * 80, e.meta["subject"].strip()))
               for e in cut["train"] if e.meta["commit"] in {r["commit"] for r in rows[::4]})


@pytest.mark.parametrize("field,value,message", [
    ("message", None, "field 'message' is missing"),
    ("repos", ["org/a"], "field 'repos' must be str, got list"),
    ("new_contents", 3, "field 'new_contents' must be str, got int"),
])
def test_commits_raw_schema_errors_name_file_line_and_field(tmp_path, field, value, message):
    rows = [commit_row(i, f"org/r{i}") for i in range(4)]
    if value is None:
        del rows[1][field]
    else:
        rows[1][field] = value
    write(tmp_path / "data" / "go" / "data.jsonl", rows)
    with pytest.raises(ValueError, match=f"data.jsonl:2: {message}"):
        hub_commits(language="go", test_size=1, download=fake_download(tmp_path))


def test_ktm_data_reads_the_hub_cache_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    cache = fake_cache(tmp_path / "hub", amazon.HUB_ID, {"raw/review_categories/Amazon_Fashion.jsonl": reviews(300)})
    fake_cache(cache, commits.HUB_ID, {"data/python/data.jsonl": [commit_row(i, f"o/r{i % 9}") for i in range(90)]})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "a"
    assert main(["data", "amazon", "--source", amazon.HUB_ID, "--out", str(out), "--test-size", "30",
                 "--train-fraction", "0.5"]) == 0
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(train), len(test)) == (135, 30)
    assert not {e.meta["parent_asin"] for e in train} & {e.meta["parent_asin"] for e in test}
    assert all(e.answer == sentiment(e.meta["rating"]) for e in train + test)
    assert "(135 examples)" in capsys.readouterr().out
    assert main(["data", "commits", "--source", commits.HUB_ID, "--out", str(tmp_path / "c"), "--test-size", "20",
                 "--seed", "3"]) == 0
    assert len(read_jsonl(tmp_path / "c" / "test.jsonl")) == 20 and len(read_jsonl(tmp_path / "c" / "train.jsonl")) == 70
    assert "length policy: {'train': {'kept': 70" in capsys.readouterr().out


def test_offline_without_a_cache_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    for dataset, source in (("amazon", amazon.HUB_ID), ("commits", commits.HUB_ID)):
        assert main(["data", dataset, "--source", source, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ktm: error: ")
        assert "is not in the Hugging Face cache" in err and "HF_HUB_OFFLINE=1" in err and source in err
    assert not (tmp_path / "o").exists()


def test_hub_options_need_a_hub_source(tmp_path, capsys):
    write(tmp_path / "r.jsonl", reviews(20))
    assert main(["data", "amazon", "--source", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o"),
                 "--category", "Books", "--test-size", "5"]) == 2
    assert "--category, --test-size apply to a Hugging Face dataset id" in capsys.readouterr().err
    assert main(["data", "amazon", "--source", "McAuley-Lab/Amazon-Reviews-2023", "--out", str(tmp_path / "o"),
                 "--category", "../etc"]) == 2
    assert "the category must be a plain name" in capsys.readouterr().err
    assert main(["data", "amazon", "--source", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o")]) == 0
