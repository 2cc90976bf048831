"""What makes a sample valid, and which K of its negatives a batch uses; shared by the converter
(`convert.py`) and both shard readers (`reader.py`, `mds.py`), so that all three reject for the same
reasons, under the same names.

A shard sample stores every negative its source gave (K or more); the reader picks K of them:
`first` (the first K, as the official DeGLA loader reads `enhanced[0..3]`) or `random` (K drawn per
sample and epoch from a seed, so a resumed run draws the same ones).
"""
from __future__ import annotations

import io
import random

# The fixed set of reject reasons (README: "Reject reasons"). Every reject, in rejects.jsonl and in the
# training log's `rejected` counts, is one of these names.
REASONS = {
    "malformed_record": "the record is not an object with the fields its format needs (e.g. no image_id)",
    "missing_image": "no image: the file does not exist, or the sample has no jpg",
    "unreadable_image": "the image does not decode (truncated or not an image)",
    "empty_caption": "no caption, or only whitespace",
    "too_few_negatives": "fewer negatives than K (the detail says how many it had)",
    "empty_negative": "a negative is empty or only whitespace",
    "negative_equals_positive": "a negative is the caption itself (ignoring case)",
}

PICKS = ("first", "random")


class Rejected(ValueError):
    """A bad record or sample: `reason` is one of REASONS, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"reject reason {reason!r} is not one of {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def decode_rgb(image, draft_size: int | None = None):
    """JPEG (or any PIL-readable) bytes, or an opened PIL image → an RGB image with every pixel decoded.

    draft_size: a JPEG may be decoded scaled down by 1/2, 1/4 or 1/8 as long as both sides stay ≥ it
    (degla_scale/data/images.py); None decodes at full size."""
    from PIL import Image

    try:
        with (Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else image) as im:
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            return im.convert("RGB")  # some COCO JPEGs are grayscale; a truncated file fails here
    except Exception as exc:
        raise Rejected("unreadable_image", type(exc).__name__) from None


def check_texts(caption: str, negatives: list, num_negatives: int) -> str:
    """The stripped caption, if the caption and negatives make a valid sample for K = `num_negatives`."""
    if not isinstance(caption, str) or not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise Rejected("malformed_record", "the caption must be a string and the negatives a list of strings")
    caption = caption.strip()
    if not caption:
        raise Rejected("empty_caption")
    if len(negatives) < num_negatives:
        raise Rejected("too_few_negatives", f"has {len(negatives)}, needs K={num_negatives}")
    if any(not n.strip() for n in negatives):
        raise Rejected("empty_negative", f"negative {[n.strip() for n in negatives].index('')}")
    if any(n.strip().lower() == caption.lower() for n in negatives):
        raise Rejected("negative_equals_positive")
    return caption


def pick_negatives(negatives: list[str], num_negatives: int, pick: str, seed: int, epoch: int, key: str) -> list[str]:
    """The K negatives a batch uses: the first K, or K drawn from (seed, epoch, sample key) alone, so the
    draw does not depend on the order samples arrive in (a resumed run draws the same)."""
    if pick == "first" or len(negatives) == num_negatives:
        return list(negatives[:num_negatives])
    if pick != "random":
        raise ValueError(f"data.negatives_pick={pick!r} must be one of {', '.join(PICKS)}")
    return random.Random(f"negatives/{seed}/{epoch}/{key}").sample(list(negatives), num_negatives)
