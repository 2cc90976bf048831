#!/usr/bin/env bash
# The CPU demo (make demo): synthetic shards → plain-CLIP pre-training → DeGLA fine-tuning on 2 ranks
# → before/after evaluation table. Re-running resumes or skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=data/synthetic
mkdir -p runs/demo

[ -f $DATA/finetune/manifest.json ] || python launch/make_shards.py --from synthetic --out $DATA
python launch/train.py --config configs/tiny_pretrain.yaml
deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml

python launch/eval.py --config configs/tiny.yaml --checkpoint runs/tiny_pretrain/final/student.pt \
  --label pretrained --out runs/demo/pretrained.json > /dev/null
python launch/eval.py --config configs/tiny.yaml --checkpoint runs/tiny/final/student.pt \
  --label degla --out runs/demo/degla.json > /dev/null
python launch/eval.py --compare runs/demo/pretrained.json runs/demo/degla.json | tee runs/demo/table.md
echo "loss curves: runs/tiny_pretrain/loss_curve.png runs/tiny/loss_curve.png"
