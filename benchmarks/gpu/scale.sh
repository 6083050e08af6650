# benchmarks/scale.py on a Llama-3-8B shape: onloaded alone first (the 15-minute target), then on the GPU, then a
# 70B block; one JSON per run (merge them into results/scale_<card>.json by run).
cd /tmp/w
export PYTHONPATH=/tmp/w/src
for run in 8b-onload 8b-gpu 70b-block; do
  python3 benchmarks/scale.py --runs "$run" --out "/tmp/r/scale_$run.json" > "/tmp/r/$run.log" 2>&1
  echo "$run done $(date +%T)"
done
touch /tmp/r/done
