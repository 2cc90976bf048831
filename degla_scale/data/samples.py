"""What makes a sample valid, and which K of its negatives a batch uses; shared by the converter
(`convert.py`) and both shard readers (`reader.py`, `mds.py`), so that all three reject for the same
reasons, under the same names.

A shard sample stores every negative its source gave (K or more); the reader picks K of them:
`first` (the first K, as the official DeGLA loader reads `enhanced[0..3]`) or `random` (K drawn per
sample and epoch from a seed, so a resumed run draws the same ones).
"""
from __future__ import annotations

import io
import json
import random
import warnings
import zlib

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
    "damaged_shard": "the shard file is cut short, empty or its structure is broken (tar headers, MDS offsets): "
                     "counts each sample lost with it (1 per damaged shard when its sample count is unknown)",
    "checksum_mismatch": "the sample's bytes differ from what was written: its stored CRC-32 does not match",
    "image_too_large": "the image has more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS): a decompression bomb",
    "caption_not_utf8": "the caption's bytes are not UTF-8",
    "unreadable_negatives": "the sample's negatives JSON does not parse (not UTF-8, or not JSON)",
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

    An image with more pixels than PIL's limit (`Image.MAX_IMAGE_PIXELS`, None = no limit) is rejected as
    `image_too_large` from its header alone, before any pixel is decoded (PIL itself only warns between
    1× and 2× the limit). 16-bit images (modes I;16*, and I from 16-bit PNGs) are scaled to 8 bits
    (v/257), not clipped as PIL's own conversion does (which turns most of such an image white); CMYK and
    the other modes go through PIL's conversion.

    draft_size: a JPEG may be decoded scaled down by 1/2, 1/4 or 1/8 as long as both sides stay ≥ it
    (degla_scale/data/images.py); None decodes at full size."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over the limit is rejected below
            opened = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
    except Image.DecompressionBombError as exc:
        raise Rejected("image_too_large", str(exc).split(" could be")[0]) from None
    except Exception as exc:
        raise Rejected("unreadable_image", type(exc).__name__) from None
    with opened as im:
        width, height = im.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            raise Rejected("image_too_large", f"{width}×{height} = {width * height} pixels > Image.MAX_IMAGE_PIXELS={limit}")
        try:
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            return _to_8bit(im).convert("RGB")  # some COCO JPEGs are grayscale; a truncated file fails here
        except Exception as exc:
            raise Rejected("unreadable_image", type(exc).__name__) from None


def _to_8bit(im):
    """A 16-bit grayscale image (I;16, I;16B, ...; or I holding values above 255) → mode L, v/257 rounded;
    any other image as it is."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    import numpy as np
    from PIL import Image

    values = np.asarray(im).astype(np.int64)
    if im.mode == "I" and values.size and values.max() <= 255 and values.min() >= 0:
        return Image.fromarray(values.astype(np.uint8), "L")  # 8-bit data held in a 32-bit mode
    return Image.fromarray(((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8), "L")


def decode_caption(raw) -> str:
    """A caption's stored bytes → str; raises `Rejected` (caption_not_utf8)."""
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("caption_not_utf8", f"byte {exc.start}: {bytes(raw)[exc.start:exc.start + 1]!r}") from None


def parse_json(raw):
    """A stored JSON field (bytes) → its value; raises `Rejected` (unreadable_negatives)."""
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected("unreadable_negatives", type(exc).__name__) from None


def sample_crc(key: str | bytes, image: bytes, caption: bytes, negatives) -> int:
    """The CRC-32 both shard writers store with a sample (wds: json `crc32`; MDS: column `crc`), over its key,
    image bytes, caption bytes and negatives (as JSON); the readers recompute it, so a sample damaged after
    writing is rejected (checksum_mismatch) instead of training on flipped pixels or words. Shards written
    before it existed carry none and are not checked."""
    key = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else bytes(key)
    crc = zlib.crc32(key + b"\0")
    crc = zlib.crc32(bytes(image), crc)
    crc = zlib.crc32(b"\0" + bytes(caption) + b"\0", crc)
    return zlib.crc32(json.dumps(negatives).encode("utf-8"), crc)


def decode_checked(key: str | bytes, image: bytes, caption: bytes, negatives, crc: int | None, num_negatives: int,
                   draft_size: int | None = None):
    """One stored sample → (RGB image, stripped positive, all its negatives), checked in the same order by
    both readers: caption bytes (caption_not_utf8), the stored checksum if any (checksum_mismatch), the
    texts (`check_texts`), then the image (`decode_rgb`, the costly part, last); raises `Rejected`."""
    text = decode_caption(caption)
    if crc is not None and sample_crc(key, image, caption.encode() if isinstance(caption, str) else caption, negatives) != crc:
        raise Rejected("checksum_mismatch", f"sample {key!r}")
    text = check_texts(text, negatives, num_negatives)
    return decode_rgb(image, draft_size), text, list(negatives)


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
