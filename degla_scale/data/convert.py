"""Convert (image, caption, K or more negatives) records into webdataset or MDS shards, validating every record.

Sources (`read_*` below) yield `Raw` records; `convert()` cuts them into shard-sized chunks, validates and
writes each chunk in a worker process, and keeps a `progress.json` of finished shards so an interrupted
run resumes where it stopped. Bad records are never dropped silently: each goes to `rejects.jsonl` with
its id, reason (one of `samples.REASONS`) and detail, and the report counts them by reason.

A record keeps every negative it has (at least K): the released DeGLA lists hold more than the K = 4 the
paper trains with, and the reader picks K of them (`data.negatives_pick`). The manifest records the
fewest negatives any sample holds, which is the largest K the shards can train with.
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
from degla_scale.data.samples import REASONS, Rejected, check_texts, decode_rgb


@dataclass
class Raw:
    """One input record before validation; `image` is a path, the JPEG bytes, or None (the sample has none). `malformed` says what is wrong
    when the source record lacks a field its format needs (it is then rejected as malformed_record)."""

    id: str
    image: Path | bytes | None
    caption: str
    negatives: list[str]
    types: list[str] = field(default_factory=list)
    malformed: str = ""


def _malformed(record_id: str, detail: str) -> Raw:
    return Raw(record_id, b"", "", [], malformed=detail)


# ---------------------------------------------------------------- sources


def coco_image(root: Path, image_id: int) -> Path:
    """COCO 2014 train image path, with or without the train2014/ folder in `root`."""
    name = f"COCO_train2014_{int(image_id):012d}.jpg"
    return root / name if (root / name).exists() else root / "train2014" / name


def read_degla_json(path: Path, image_root: Path) -> Iterator[Raw]:
    """The released DeGLA format: a JSON list of {image_id, original, enhanced: [negatives]} (the official
    loader, `COM_COCO`, reads `enhanced[0..3]`; the lists may hold more). An optional `types` list, parallel
    to `enhanced`, is kept."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise DataError(f"{path}: a DeGLA-format file is a JSON list of records, not a {type(records).__name__}")
    for i, r in enumerate(records):
        try:
            image_id = int(r["image_id"])
        except (KeyError, TypeError, ValueError):
            yield _malformed(f"record_{i}", "needs an integer image_id")
            continue
        yield Raw(f"{image_id:012d}_{i}", coco_image(image_root, image_id), r.get("original") or "",
                  r.get("enhanced") or [], r.get("types") or [])


def read_jsonl(path: Path, image_root: Path | None, negatives: dict | None = None) -> Iterator[Raw]:
    """One {image, caption, negatives[, types][, id]} per line; image paths relative to `image_root`
    (default: the file's folder). A `negatives` side table (by id) overrides the lines' own."""
    root = image_root or Path(path).parent
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                image = root / r["image"]
            except (ValueError, KeyError, TypeError):
                yield _malformed(f"line_{i + 1}", "needs a JSON object with an image path")
                continue
            rid = str(r.get("id", i)).replace(".", "_")
            negs, types = r.get("negatives") or [], r.get("types") or []
            if negatives is not None and rid in negatives:
                negs, types = negatives[rid]
            yield Raw(rid, image, r.get("caption") or "", negs, types)


def read_side_negatives(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """A negatives side file: one {id (or key), negatives[, types]} per line."""
    table = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    table[str(r.get("id", r.get("key")))] = (r.get("negatives") or [], r.get("types") or [])
                except (ValueError, AttributeError):
                    raise DataError(f"{path}:{number} is not a JSON object {{id, negatives[, types]}}: fix that line") from None
    return table


def read_wds(urls: str, negatives: dict) -> Iterator[Raw]:
    """Existing img2dataset shards (jpg + txt), their negatives from a side table by sample key."""
    import webdataset as wds

    from degla_scale.data.reader import list_shards

    for sample in wds.DataPipeline(wds.SimpleShardList(list_shards(urls)), wds.tarfile_to_samples()):
        key = sample["__key__"]
        negs, types = negatives.get(key, ([], []))
        yield Raw(key, sample.get("jpg"), sample.get("txt", b"").decode("utf-8", errors="replace"), negs, types)


# ---------------------------------------------------------------- validation and writing


def validate(raw: Raw, num_negatives: int) -> dict:
    """→ the shard record, with every negative the source gave; raises `Rejected`."""
    if raw.malformed:
        raise Rejected("malformed_record", raw.malformed)
    if raw.image is None:
        raise Rejected("missing_image", "the sample has no jpg")
    if isinstance(raw.image, Path):
        if not raw.image.is_file():
            raise Rejected("missing_image", str(raw.image))
        data = raw.image.read_bytes()
    else:
        data = raw.image
    rgb = decode_rgb(data)
    caption = check_texts(raw.caption, raw.negatives, num_negatives)
    if not data.startswith(b"\xff\xd8\xff"):  # not JPEG: shards hold JPEG, so re-encode PNGs and the like once, here
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
    known = isinstance(raw.types, list) and len(raw.types) == len(raw.negatives)
    types = [str(t) for t in raw.types] if known else []  # a type per negative, or none
    return {"key": raw.id, "jpg": data, "caption": caption, "negatives": list(raw.negatives), "types": types}


def _write_chunk(job: tuple) -> dict:
    """Validate one chunk and write it as one shard; → {shard, written, rejects: [(id, reason, detail)],
    images, negatives: {count: records}}."""
    out_dir, name, fmt, chunk, num_negatives = job
    good, rejects, images, counts = [], [], set(), Counter()
    for raw in chunk:
        try:
            record = validate(raw, num_negatives)
        except Rejected as exc:
            rejects.append((raw.id, exc.reason, exc.detail))
            continue
        good.append(record)
        counts[len(record["negatives"])] += 1
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
    return {"shard": name, "written": len(good), "rejects": rejects, "images": sorted(images),
            "negatives": {str(n): c for n, c in sorted(counts.items())}}  # str keys: it round-trips through JSON


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
    rejects = [reject for d in shards for reject in d["rejects"]]
    with open(out_dir / "rejects.jsonl", "w") as f:
        for rid, reason, detail in rejects:
            f.write(json.dumps({"id": rid, "reason": reason, "detail": detail}) + "\n")
    if fmt == "mds":
        from streaming.base.util import merge_index

        merge_index(str(out_dir), keep_local=True)
    written = sum(d["written"] for d in shards)
    reasons = Counter(reason for _, reason, _ in rejects)
    per_sample = sum((Counter({int(n): c for n, c in d["negatives"].items()}) for d in shards), Counter())
    distinct = len({image for d in shards for image in d["images"]})
    report = {"format": fmt, "num_samples": written, "num_negatives": num_negatives,
              "shards": [d["shard"] for d in shards], "read": written + len(rejects),
              # per shard, so a reader can count what a damaged shard lost (degla_scale/data/reader.py)
              "shard_samples": {d["shard"]: d["written"] for d in shards},
              "rejected": {r: reasons.get(r, 0) for r in REASONS},
              # every negative is stored; the reader picks K of them, so K may be at most min_negatives
              "min_negatives": min(per_sample, default=0), "max_negatives": max(per_sample, default=0),
              "more_than_k": sum(c for n, c in per_sample.items() if n > num_negatives),
              "negatives_stored": sum(n * c for n, c in per_sample.items()),
              "negatives_per_sample": {str(n): per_sample[n] for n in sorted(per_sample)},
              "distinct_images": distinct,
              # COCO has ~5 captions per image and one record per caption: each image is stored that often
              "records_per_image": round(written / max(distinct, 1), 2)}
    (out_dir / "manifest.json").write_text(json.dumps(report, indent=1))
    return report
