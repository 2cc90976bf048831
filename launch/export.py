"""Export a run's weights to a safetensors file that open_clip loads directly.

    python launch/export.py --checkpoint runs/vitl14 --out exports/vitl14.safetensors [--which teacher]
    # then: open_clip.create_model_and_transforms("ViT-L-14", pretrained="exports/vitl14.safetensors")

--checkpoint: a run directory, its checkpoints/ folder, one checkpoints/stepNNNNNNNN folder (any ZeRO
stage), or a final/student.pt. The model name is read from the run's config.json when there is one.
"""
import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--which", choices=["student", "teacher"], default="student")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or folder")

    from degla_scale.export import ExportError, checkpoint_state_dict, export_safetensors, run_model_section

    try:
        state = checkpoint_state_dict(args.checkpoint, args.which)
        name = (run_model_section(args.checkpoint) or {}).get("name")
        out = export_safetensors(state, args.out, {"model": name or "unknown", "source": str(args.checkpoint),
                                                   "which": args.which})
    except ExportError as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    count = sum(v.numel() for v in state.values())
    print(f"wrote {out} ({count / 1e6:.1f}M parameters, fp32); load it with "
          f"open_clip.create_model_and_transforms({name or '<model name>'!r}, pretrained={str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
