"""Export a run's weights for plain open_clip.

    python launch/export.py --checkpoint runs/vitl14 --out exports/vitl14 [--which teacher]
    # then, in any Python with open_clip (no degla_scale needed):
    #   open_clip.create_model_and_transforms("local-dir:exports/vitl14")
    python launch/export.py --checkpoint runs/vitl14 --out exports/vitl14.safetensors   # the weights file only
    #   open_clip.create_model_and_transforms("ViT-L-14", pretrained="exports/vitl14.safetensors")

--checkpoint: a run directory, its checkpoints/ folder, one checkpoints/stepNNNNNNNN folder (any ZeRO
stage), or a final/student.pt. The model (name, pretrained tag) is read from the run's config.json;
--model-name gives it where there is none. --out DIR writes DIR/open_clip_config.json (the architecture,
also a custom one, and its preprocessing) and DIR/open_clip_model.safetensors.
"""
import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="a directory, or a .safetensors file")
    parser.add_argument("--which", choices=["student", "teacher"], default="student")
    parser.add_argument("--model-name", help="open_clip architecture, when the run has no config.json")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or folder")

    from degla_scale import cli

    return cli.run(lambda: export(args))


def export(args) -> int:
    from degla_scale.config import ModelConfig
    from degla_scale.export import ExportError, checkpoint_state_dict, export_dir, export_safetensors, run_model_section

    section = run_model_section(args.checkpoint) or {}
    name = args.model_name or section.get("name")
    state = checkpoint_state_dict(args.checkpoint, args.which)
    metadata = {"model": name or "unknown", "source": str(args.checkpoint), "which": args.which}
    count = sum(v.numel() for v in state.values()) / 1e6
    if args.out.suffix == ".safetensors":
        out = export_safetensors(state, args.out, metadata)
        from degla_scale.models import is_custom_architecture

        custom = name and is_custom_architecture(name)
        print(f"wrote {out} ({count:.1f}M parameters, fp32); load it with open_clip.create_model_and_transforms("
              f"{name or '<model name>'!r}, pretrained={str(out)!r})" + (
                  f" after `import degla_scale.models` ({name} is this project's architecture; --out DIR needs no "
                  "import)" if custom else ""))
        return 0
    if not name:
        raise ExportError(f"{args.checkpoint} has no run config.json beside it: pass --model-name (e.g. ViT-B-32)")
    out = export_dir(state, args.out, ModelConfig(name, pretrained=section.get("pretrained")), metadata)
    print(f"wrote {out}/open_clip_config.json and open_clip_model.safetensors ({count:.1f}M parameters, fp32); load it "
          f"with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
