#!/usr/bin/env bash
# The CPU demo (make demo): synthetic shards → plain-CLIP pre-training → DeGLA fine-tuning on 2 ranks
# (evaluated during training) → before/after evaluation table and the eval curve. Re-running resumes or skips what is done.
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
# evaluated once an epoch (and before the first step) on student and teacher; best/ keeps the best SugarCrepe
# average; a warning if zero-shot acc1 falls 5 points below the pre-trained model's
deepspeed --num_gpus 2 launch/train.py --config configs/tiny.yaml data.format=$FORMAT data.train_shards=$DATA/finetune \
  model.pretrained=$RUNS/tiny_pretrain/final/student.pt run_dir=$RUNS/tiny evaluation.data_root=$DATA \
  evaluation.every=125 evaluation.teacher=true evaluation.max_zeroshot_drop=5 checkpoint.best_metric=eval/sugarcrepe/average

python launch/eval.py --config configs/tiny.yaml --out $RUNS/demo evaluation.data_root=$DATA \
  --model pretrained=$RUNS/tiny_pretrain/final/student.pt --model degla=$RUNS/tiny/final/student.pt > /dev/null
cat $RUNS/demo/table.md
echo
echo "Evaluations during fine-tuning (composition and zero-shot vs steps, student and teacher):"
python -c "from degla_scale.train_eval import curve_table; print(curve_table('$RUNS/tiny/train.jsonl'))"
echo "chart: $RUNS/demo/chart.png; eval curve: $RUNS/tiny/eval_curve.png; best weights: $RUNS/tiny/best;" \
  "loss curves: $RUNS/tiny_pretrain/loss_curve.png $RUNS/tiny/loss_curve.png"
