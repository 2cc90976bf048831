"""Convert (image, caption, K negatives) records into webdataset or MDS shards, validating every record.

Sources (`read_*` below) yield `Raw` records; `convert()` cuts them into shard-sized chunks, validates and
writes each chunk in a worker process, and keeps a `progress.json` of finished shards so an interrupted
run resumes where it stopped. Bad records are never dropped silently: each goes to `rejects.jsonl` with
its id and reason, and the report counts them by reason.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

from degla_scale.data.reader import DataError

REASONS = ("missing_image", "unreadable_image", "wrong_negatives", "empty_caption", "negative_equals_positive")


@dataclass
class Raw:
    """One input record before validation; `image` is a path or the JPEG bytes."""

    id: str
    image: Path | bytes
    caption: str
    negatives: list[str]
    types: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- sources


def coco_image(root: Path, image_id: int) -> Path:
    """COCO 2014 train image path, with or without the train2014/ folder in `root`."""
    name = f"COCO_train2014_{int(image_id):012d}.jpg"
    return root / name if (root / name).exists() else root / "train2014" / name


def read_degla_json(path: Path, image_root: Path) -> Iterator[Raw]:
    """The released DeGLA format: a JSON list of {image_id, original, enhanced: [negatives]}."""
    records = json.loads(Path(path).read_text())
    for i, r in enumerate(records):
        yield Raw(f"{int(r['image_id']):012d}_{i}", coco_image(image_root, r["image_id"]), r.get("original") or "",
                  list(r.get("enhanced") or []))


def read_jsonl(path: Path, image_root: Path | None, negatives: dict | None = None) -> Iterator[Raw]:
    """One {image, caption, negatives[, types][, id]} per line; image paths relative to `image_root`
    (default: the file's folder). A `negatives` side table (by id) overrides the lines' own."""
    root = image_root or Path(path).parent
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            rid = str(r.get("id", i)).replace(".", "_")
            negs, types = r.get("negatives") or [], r.get("types") or []
            if negatives is not None and rid in negatives:
                negs, types = negatives[rid]
            yield Raw(rid, root / r["image"], r.get("caption") or "", list(negs), list(types))


def read_side_negatives(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """A negatives side file: one {id (or key), negatives[, types]} per line."""
    table = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                table[str(r.get("id", r.get("key")))] = (list(r.get("negatives") or []), list(r.get("types") or []))
    return table


def read_wds(urls: str, negatives: dict) -> Iterator[Raw]:
    """Existing img2dataset shards (jpg + txt), their negatives from a side table by sample key."""
    import webdataset as wds

    from degla_scale.data.reader import list_shards

    for sample in wds.DataPipeline(wds.SimpleShardList(list_shards(urls)), wds.tarfile_to_samples()):
        key = sample["__key__"]
        negs, types = negatives.get(key, ([], []))
        yield Raw(key, sample.get("jpg", b""), sample.get("txt", b"").decode("utf-8"), negs, types)


# ---------------------------------------------------------------- validation and writing


def validate(raw: Raw, num_negatives: int) -> tuple[dict | None, str | None]:
    """→ (the shard record, None) or (None, the reason it is rejected)."""
    from PIL import Image

    if isinstance(raw.image, Path):
        if not raw.image.is_file():
            return None, "missing_image"
        data = raw.image.read_bytes()
    else:
        data = raw.image
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB")  # decodes every pixel: a truncated file fails here
            is_jpeg = im.format == "JPEG"
    except Exception:
        return None, "unreadable_image"
    caption = raw.caption.strip()
    if not caption:
        return None, "empty_caption"
    if len(raw.negatives) != num_negatives:
        return None, "wrong_negatives"
    if any(n.strip().lower() == caption.lower() for n in raw.negatives):
        return None, "negative_equals_positive"
    if not is_jpeg:  # shards hold JPEG: re-encode PNGs and the like once, here
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
    return {"key": raw.id, "jpg": data, "caption": caption, "negatives": raw.negatives, "types": raw.types}, None


def _write_chunk(job: tuple) -> dict:
    """Validate one chunk and write it as one shard; → {shard, written, rejects: [(id, reason)]}."""
    out_dir, name, fmt, chunk, num_negatives = job
    good, rejects, images = [], [], set()
    for raw in chunk:
        record, reason = validate(raw, num_negatives)
        if record is None:
            rejects.append((raw.id, reason))
        else:
            good.append(record)
            images.add(str(raw.image) if isinstance(raw.image, Path) else raw.id)
    target = out_dir / name
    if fmt == "mds":
        import shutil

        from degla_scale.data.mds import write_mds

        shutil.rmtree(target, ignore_errors=True)  # a half-written shard of an interrupted run
        write_mds(target, iter(good))
    else:
        from degla_scale.data.reader import write_wds

        write_wds(target, good)
    return {"shard": name, "written": len(good), "rejects": rejects, "images": sorted(images)}


def _chunks(records: Iterator[Raw], size: int) -> Iterator[list[Raw]]:
    chunk = []
    for r in records:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def convert(records: Iterator[Raw], out_dir: Path, fmt: str, num_negatives: int, shard_size: int,
            workers: int = 2, progress: bool = True) -> dict:
    """Write shards, `rejects.jsonl`, `manifest.json`; resumes from `progress.json`. → the report."""
    if fmt not in ("wds", "mds"):
        raise DataError(f"--format {fmt!r} must be wds or mds")
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = out_dir / "progress.json"
    done = {d["shard"]: d for d in json.loads(state_file.read_text())["shards"]} if state_file.is_file() else {}

    def jobs():
        for index, chunk in enumerate(_chunks(records, shard_size)):
            name = f"shard-{index:06d}" + (".tar" if fmt == "wds" else "")
            if name not in done:  # finished by an earlier, interrupted run
                yield out_dir, name, fmt, chunk, num_negatives

    from tqdm import tqdm

    bar = tqdm(desc=f"{fmt} shards", unit="shard", initial=len(done), disable=not progress)
    with Pool(workers) as pool:
        for result in pool.imap(_write_chunk, jobs()):
            done[result["shard"]] = result
            state_file.write_text(json.dumps({"shards": sorted(done.values(), key=lambda d: d["shard"])}))
            bar.update(1)
    bar.close()

    shards = sorted(done.values(), key=lambda d: d["shard"])
    rejects = [(rid, reason) for d in shards for rid, reason in d["rejects"]]
    with open(out_dir / "rejects.jsonl", "w") as f:
        for rid, reason in rejects:
            f.write(json.dumps({"id": rid, "reason": reason}) + "\n")
    if fmt == "mds":
        from streaming.base.util import merge_index

        merge_index(str(out_dir), keep_local=True)
    written = sum(d["written"] for d in shards)
    counts = Counter(reason for _, reason in rejects)
    distinct = len({image for d in shards for image in d["images"]})
    report = {"format": fmt, "num_samples": written, "num_negatives": num_negatives,
              "shards": [d["shard"] for d in shards], "read": written + len(rejects),
              "rejected": {r: counts.get(r, 0) for r in REASONS}, "distinct_images": distinct,
              # COCO has ~5 captions per image and one record per caption: each image is stored that often
              "records_per_image": round(written / max(distinct, 1), 2)}
    (out_dir / "manifest.json").write_text(json.dumps(report, indent=1))
    return report
