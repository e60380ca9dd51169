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

from .base import Example, FileTask, iter_json_objects

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
