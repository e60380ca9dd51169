"""Amazon review sentiment, the paper's first real benchmark (accuracy and macro-F1).

Each review becomes the prompt ``Review: {text}, Label:`` with the answer ``positive`` when
its star rating is at least 3.5, else ``negative`` (the paper's rule). Reviews are read from
JSONL files with the fields ``rating`` and ``text`` (any others, such as ``title``,
``category`` or a product id, are kept as metadata):

* a folder with ``train.jsonl`` and ``test.jsonl`` (or ``dev.jsonl``), used as split, such
  as the 12,000 + 1,000 real reviews of ``shared/data/amazon`` in this project;
* one ``.jsonl`` file, split here by product (``parent_asin``, ``asin`` or ``product_id``)
  so that no product is in both splits, or by review where there is no product id;
* the paper's Hugging Face dataset, one category's raw file (:func:`hub_reviews`), split as
  the release does: 50,000 reviews held out by whole products, 10% of the rest for training.

Example::

    >>> review_prompt("Great shoes"), sentiment(4.0), sentiment(3.0)
    ('Review: Great shoes, Label:', 'positive', 'negative')

"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .base import Example, FileTask, check_fields, iter_json_objects, split_by_count
from .hub import check_name, hub_file

POSITIVE, NEGATIVE = "positive", "negative"
PRODUCT_FIELDS = ("parent_asin", "asin", "product_id")
#: the paper's dataset on the Hugging Face Hub, and its release's split
HUB_ID, CATEGORY, TEST_SIZE, TRAIN_FRACTION = "McAuley-Lab/Amazon-Reviews-2023", "Amazon_Fashion", 50_000, 0.1
#: one line of the dataset's raw review files (``raw/review_categories/<Category>.jsonl``)
RAW_FIELDS = {"rating": float, "title": str, "text": str, "images": list, "asin": str, "parent_asin": str,
              "user_id": str, "timestamp": int, "helpful_vote": int, "verified_purchase": bool}


def review_prompt(text: str) -> str:
    """The paper's prompt for one review."""
    return f"Review: {text}, Label:"


def sentiment(rating: float) -> str:
    """``positive`` for a star rating >= 3.5, else ``negative``."""
    return POSITIVE if float(rating) >= 3.5 else NEGATIVE


def review_example(where: str, row: dict, max_chars: int = 0) -> Example:
    """One review (a JSON object with ``rating`` and ``text``, read at ``where``) as an example;
    its other fields are kept as metadata."""
    if "rating" not in row or not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: expected a numeric 'rating' and a string 'text'")
    try:
        answer = sentiment(row["rating"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: 'rating' must be a number, got {row['rating']!r}") from e
    text = row["text"].strip()
    if max_chars > 0:
        text = text[:max_chars]
    meta = {k: v for k, v in row.items() if k != "text"}
    return Example(review_prompt(text), answer, meta, source=where)


def read_reviews(path: Path, max_chars: int = 0) -> list[Example]:
    """Reviews of a JSONL file as examples; ``max_chars`` > 0 cuts each text to that many
    characters. Bad lines raise ``ValueError`` naming ``file:line``."""
    out = [review_example(where, row, max_chars) for where, row in iter_json_objects(path)]
    if not out:
        raise ValueError(f"{path} holds no reviews")
    return out


def raw_reviews(path: Path):
    """``(file:line, row)`` for each line of a raw review file of Amazon-Reviews-2023; a line
    that lacks a field of :data:`RAW_FIELDS` or holds another type raises ``ValueError``
    naming file, line and field."""
    for where, row in iter_json_objects(path):
        check_fields(where, row, RAW_FIELDS)
        yield where, row


def hub_reviews(source: str = HUB_ID, category: str = CATEGORY, *, test_size: int = TEST_SIZE,
                train_fraction: float = TRAIN_FRACTION, seed: int = 0, max_chars: int = 0,
                download=None) -> tuple[dict[str, list[Example]], str]:
    """The release's splits of one category of Amazon-Reviews-2023, and a line saying what
    was held out.

    The dataset's loader is a script, which ``datasets`` >= 4 no longer runs, so its raw file
    is read instead. Assumed layout (the one the dataset's README lists as the data files of
    the config ``raw_review_<Category>``, split ``full``): ``raw/review_categories/<Category>.jsonl``,
    one review per line with the fields of :data:`RAW_FIELDS`, e.g. ``{"rating": 5.0,
    "title": ..., "text": ..., "images": [], "asin": ..., "parent_asin": ..., "user_id": ...,
    "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": true}``.
    ``test_size`` reviews are held out by whole products (``parent_asin``) and
    ``train_fraction`` of the other reviews are sampled for training (see
    :func:`ktm.tasks.base.split_by_count`); ``download`` is ``hf_hub_download`` or a stand-in.

    Example (downloads the category's file once, then reads the cache)::

        splits, note = hub_reviews(category="Amazon_Fashion")
    """
    path = hub_file(source, f"raw/review_categories/{check_name(category, 'the category')}.jsonl", download)
    rows = split_by_count(lambda: raw_reviews(path), lambda r: r[1]["parent_asin"], test_size, train_fraction, seed)
    splits = {s: [review_example(where, row, max_chars) for where, row in rows[s]] for s in ("train", "test")}
    products = len({e.meta["parent_asin"] for e in splits["test"]})
    return splits, (f"{category}: {len(splits['test'])} reviews of {products} products held out, "
                    f"{train_fraction:.0%} of the other reviews for training")


class AmazonTask(FileTask):
    """Sentiment of Amazon reviews (see the module's docstring for the sources).

    Args:
        source: a folder with train.jsonl and test.jsonl (or dev.jsonl), or one .jsonl file.
        max_chars: cut each review's text to this many characters (0: whole reviews).
        test_fraction: share held out when ``source`` is one file.
    """

    name = "amazon"
    metric = "accuracy"
    max_new_tokens = 3
    what = "review"

    @dataclass(frozen=True)
    class Options:
        reviews: str | None = field(default=None, metadata={
            "help": "amazon task: folder with train.jsonl and test.jsonl (or dev.jsonl), or one .jsonl "
                    "file (split here by product)"})
        review_chars: int = field(default=0, metadata={"help": "amazon task: cut each review to this many "
                                                               "characters (0: whole reviews)"})

    @classmethod
    def from_options(cls, options: "AmazonTask.Options") -> list["AmazonTask"]:
        if not options.reviews:
            raise ValueError("the amazon task needs --reviews (a folder with train.jsonl and test.jsonl "
                             "or dev.jsonl, or one .jsonl file of reviews)")
        return [cls(options.reviews, max_chars=options.review_chars)]

    def __init__(self, source: str | Path, max_chars: int = 0, test_fraction: float = 0.1):
        super().__init__(source, test_fraction)
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars}")
        self.max_chars = max_chars

    def read(self, file: Path, split: str) -> list[Example]:
        return read_reviews(file, self.max_chars)

    def split_key(self, example: Example) -> str:
        return next((str(example.meta[f]) for f in PRODUCT_FIELDS if example.meta.get(f)), example.prompt)
