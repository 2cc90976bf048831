"""Data loading throughput: samples/s of one loader worker (read + JPEG decode + transform + tokenise)
for webdataset and MDS shards, and the workers per GPU needed to feed the training step.

    python benchmarks/bench_data.py --config configs/vitl14.yaml
    python benchmarks/bench_data.py --config configs/tiny.yaml --samples 64 --image-size 128x96   # smoke run

Shards are made here from COCO-sized JPEGs (smooth random images, --image-size) with K negatives each,
by the project's converter. Each format is read by the trainer's own reader with num_workers=0, so the
time per sample is what one DataLoader worker spends on it, through two pipelines in the same run:
`full fp32` (full JPEG decode, open_clip's preprocess to a normalised fp32 tensor: the trainer before the
uint8 hot path) and `draft uint8` (reduced-size JPEG decode where the resize downsizes, uint8 out,
normalised later on the GPU: the trainer's pipeline now). The step rate to feed comes from
--step-samples-per-s (a bench_train_step.py measurement, per GPU) or is estimated from the config's model:
forward FLOPs per sample counted on the meta device, × (3 student + 1 teacher), at --mfu of --peak-tflops.
Rows are appended to OUT/data.csv (--out, default runs/benchmarks/), with a bar plot (data.png).
"""
from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import add_output_args, append_rows, environment, print_written  # noqa: E402
from degla_scale.config import load_config  # noqa: E402
from degla_scale.data.convert import Raw, convert  # noqa: E402
from degla_scale.data.mds import MDSReader  # noqa: E402
from degla_scale.data.reader import DataPosition, ShardReader, list_shards  # noqa: E402
from degla_scale.models import build_model, image_transform, tokenizer, train_image_transform  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0


def photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A smooth random image (upsampled colour noise) with a little grain: JPEG sizes like photos'."""
    from PIL import Image

    coarse = Image.fromarray(rng.integers(0, 256, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def records(n: int, k: int, width: int, height: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        yield Raw(f"s{i:06d}", photo_jpeg(rng, width, height), f"a red cube left of a small blue ball number {i}",
                  [f"a blue cube left of a small red ball number {i} v{j}" for j in range(k)])


def per_worker_rate(reader, num_batches: int, batch_size: int) -> float:
    """Samples/s of the in-process pipeline, after one warm-up batch."""
    batches = reader.epoch(DataPosition())
    next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch_size / (time.perf_counter() - start)


def estimated_step_rate(cfg, mfu: float, peak_tflops: float) -> tuple[float, float]:
    """(samples/s one GPU trains at, training FLOPs per sample) from the model's forward FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model, load_weights=False, device="meta")
    size = model.clip.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    k = cfg.data.num_negatives
    images = torch.zeros(1, 3, *size, device="meta")
    tokens = torch.zeros(1 + k, model.clip.context_length, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, tokens)
    per_sample = (3 + int(cfg.objective.needs_teacher)) * counter.get_total_flops()
    return mfu * peak_tflops * 1e12 / per_sample, per_sample


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--samples", type=int, default=512, help="samples per format (in shards of 128)")
    parser.add_argument("--image-size", default="640x480", help="stored JPEG size, WxH (COCO: about 640x480)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--step-samples-per-s", type=float, help="measured training rate per GPU to feed")
    parser.add_argument("--mfu", type=float, default=0.40, help="MFU assumed for the estimate (the scale target)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    add_output_args(parser, "data")
    args, overrides = parser.parse_known_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    if args.samples < 2 * args.batch_size:
        parser.error(f"--samples {args.samples} must hold at least two batches of --batch-size {args.batch_size}")
    cfg = load_config(args.config, overrides + ["model.pretrained=null"])
    k = cfg.data.num_negatives
    if args.step_samples_per_s:
        feed, source = args.step_samples_per_s, "measured (--step-samples-per-s)"
    else:
        feed, flops = estimated_step_rate(cfg, args.mfu, args.peak_tflops)
        feed = round(feed, 1)
        source = f"estimate: {flops / 1e9:.0f} GFLOP/sample at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s"
    # The transform without a draft_size decodes at full size: the pipeline before the uint8 hot path.
    pipelines = {"full fp32": image_transform(cfg.model), "draft uint8": train_image_transform(cfg.model)}
    tokenize = tokenizer(cfg.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("wds", "mds"):
            out = Path(tmp) / fmt
            convert(records(args.samples, k, width, height), out, fmt, k, shard_size=128, workers=2, progress=False)
            shard_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            for pipeline, transform in pipelines.items():
                common = dict(batch_size=args.batch_size, num_negatives=k, num_workers=0, seed=0, transform=transform,
                              tokenize=tokenize)
                reader = (MDSReader(str(out), **common) if fmt == "mds" else
                          ShardReader(list_shards(str(out)), shuffle_buffer=64, rank=0, world=1, **common))
                rate = round(per_worker_rate(reader, args.samples // args.batch_size - 1, args.batch_size), 1)
                rows.append({**environment(), "model": cfg.model.name, "format": fmt, "pipeline": pipeline,
                             "image": args.image_size, "kib_per_sample": round(shard_bytes / args.samples / 1024, 1),
                             "negatives": k, "batch": args.batch_size, "samples_per_s_per_worker": rate,
                             "feed_samples_per_s_per_gpu": feed, "feed_source": source,
                             "workers_per_gpu": math.ceil(feed / rate)})
                print(f"{fmt} {pipeline}: {rate:.1f} samples/s per worker ({rows[-1]['kib_per_sample']} KiB/sample); "
                      f"{cfg.model.name} trains {feed:.0f} samples/s per GPU ({source}) → "
                      f"{rows[-1]['workers_per_gpu']} workers per GPU")
            before, after = rows[-2]["samples_per_s_per_worker"], rows[-1]["samples_per_s_per_worker"]
            print(f"{fmt}: draft uint8 / full fp32 = {after / before:.2f}× (same run)")
    path = append_rows(args.out / f"{args.name}.csv", rows)
    print_written(path, plot(rows, args.out / f"{args.name}.png"))
    return 0


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    colours = {"full fp32": "#4878d0", "draft uint8": "#ee854a"}
    bars = ax.bar([f"{r['format']}\n{r['pipeline']}" for r in rows], [r["samples_per_s_per_worker"] for r in rows],
                  color=[colours.get(r["pipeline"], "#888888") for r in rows])
    for bar, r in zip(bars, rows):
        ax.annotate(f"{r['workers_per_gpu']} workers/GPU", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("samples/s per loader worker")
    ax.set_title(f"decode + transform + tokenise, {rows[0]['model']}, {rows[0]['image']} JPEG", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
