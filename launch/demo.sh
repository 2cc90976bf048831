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

python launch/eval.py --config configs/tiny.yaml --out $RUNS/demo evaluation.data_root=$DATA \
  --model pretrained=$RUNS/tiny_pretrain/final/student.pt --model degla=$RUNS/tiny/final/student.pt > /dev/null
cat $RUNS/demo/table.md
echo "chart: $RUNS/demo/chart.png; loss curves: $RUNS/tiny_pretrain/loss_curve.png $RUNS/tiny/loss_curve.png"
