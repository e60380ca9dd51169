"""Amazon review sentiment, the paper's first real benchmark (accuracy and macro-F1).

Each review becomes the prompt ``Review: {text}, Label:`` with the answer ``positive`` when
its star rating is at least 3.5, else ``negative`` (the paper's rule). Reviews are read from
local JSONL files with the fields ``rating`` and ``text`` (any others, such as ``title``,
``category`` or a product id, are kept as metadata):

* a folder with ``train.jsonl`` and ``test.jsonl`` (or ``dev.jsonl``), used as split, such
  as the 12,000 + 1,000 real reviews of ``shared/data/amazon`` in this project;
* one ``.jsonl`` file, split here by product (``parent_asin``, ``asin`` or ``product_id``)
  so that no product is in both splits, or by review where there is no product id.

Example::

    >>> review_prompt("Great shoes"), sentiment(4.0), sentiment(3.0)
    ('Review: Great shoes, Label:', 'positive', 'negative')

"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .base import Example, Task, iter_json_objects, split_by_key

POSITIVE, NEGATIVE = "positive", "negative"
PRODUCT_FIELDS = ("parent_asin", "asin", "product_id")


def review_prompt(text: str) -> str:
    """The paper's prompt for one review."""
    return f"Review: {text}, Label:"


def sentiment(rating: float) -> str:
    """``positive`` for a star rating >= 3.5, else ``negative``."""
    return POSITIVE if float(rating) >= 3.5 else NEGATIVE


def read_reviews(path: Path, max_chars: int = 0) -> list[Example]:
    """Reviews of a JSONL file as examples; ``max_chars`` > 0 cuts each text to that many
    characters. Bad lines raise ``ValueError`` naming ``file:line``."""
    out = []
    for where, row in iter_json_objects(path):
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
        out.append(Example(review_prompt(text), answer, meta, source=where))
    if not out:
        raise ValueError(f"{path} holds no reviews")
    return out


class AmazonTask(Task):
    """Sentiment of Amazon reviews (see the module's docstring for the sources).

    Args:
        source: a folder with train.jsonl and test.jsonl (or dev.jsonl), or one .jsonl file.
        max_chars: cut each review's text to this many characters (0: whole reviews).
        test_fraction: share held out when ``source`` is one file.
    """

    name = "amazon"
    metric = "accuracy"
    max_new_tokens = 3

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
        self.source = Path(source)
        if not self.source.exists():
            raise FileNotFoundError(f"no such review file or folder: {self.source}")
        if max_chars < 0 or not 0 < test_fraction < 1:
            raise ValueError(f"max_chars must be >= 0 and test_fraction in (0, 1), got {max_chars}, {test_fraction}")
        self.max_chars, self.test_fraction = max_chars, test_fraction
        self._splits: dict[str, list[Example]] | None = None

    @property
    def label(self) -> str:
        return f"amazon {self.source.name}"

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if self._splits is None:
            self._splits = self._load()
        return self._splits[split]

    def _load(self) -> dict[str, list[Example]]:
        if self.source.is_dir():
            test = next((self.source / n for n in ("test.jsonl", "dev.jsonl") if (self.source / n).is_file()), None)
            if test is None or not (self.source / "train.jsonl").is_file():
                raise FileNotFoundError(f"{self.source} needs train.jsonl and test.jsonl (or dev.jsonl)")
            return {"train": read_reviews(self.source / "train.jsonl", self.max_chars),
                    "test": read_reviews(test, self.max_chars)}
        reviews = read_reviews(self.source, self.max_chars)
        return split_by_key(reviews, lambda e: next((e.meta[f] for f in PRODUCT_FIELDS if e.meta.get(f)), e.prompt),
                            self.test_fraction)
