#!/usr/bin/env bash
# The CPU demo (make demo): synthetic shards → plain-CLIP pre-training → DeGLA fine-tuning on 2 ranks
# → before/after evaluation table. Re-running resumes or skips what is done.
# FORMAT=mds (make demo FORMAT=mds) runs the same demo on mosaicml-streaming shards instead of webdataset.
set -euo pipefail
cd "$(dirname "$0")/.."
FORMAT=${FORMAT:-wds}
case $FORMAT in
  wds) DATA=data/synthetic RUNS=runs ;;
  mds) DATA=data/synthetic_mds RUNS=runs/mds ;;
  *) echo "FORMAT=$FORMAT: use wds or mds" >&2; exit 2 ;;
esac
mkdir -p $RUNS/demo

[ -f $DATA/finetune/manifest.json ] || python launch/make_shards.py --from synthetic --format $FORMAT --out $DATA
python launch/train.py --config configs/tiny_pretrain.yaml data.format=$FORMAT data.train_shards=$DATA/pretrain \
  run_dir=$RUNS/tiny_pretrain
deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml data.format=$FORMAT data.train_shards=$DATA/finetune \
  model.pretrained=$RUNS/tiny_pretrain/final/student.pt run_dir=$RUNS/tiny

EVAL="evaluation.sugarcrepe_dir=$DATA/sugarcrepe evaluation.zeroshot_dir=$DATA/zeroshot"
python launch/eval.py --config configs/tiny.yaml --checkpoint $RUNS/tiny_pretrain/final/student.pt \
  --label pretrained --out $RUNS/demo/pretrained.json $EVAL > /dev/null
python launch/eval.py --config configs/tiny.yaml --checkpoint $RUNS/tiny/final/student.pt \
  --label degla --out $RUNS/demo/degla.json $EVAL > /dev/null
python launch/eval.py --compare $RUNS/demo/pretrained.json $RUNS/demo/degla.json | tee $RUNS/demo/table.md
echo "loss curves: $RUNS/tiny_pretrain/loss_curve.png $RUNS/tiny/loss_curve.png"
