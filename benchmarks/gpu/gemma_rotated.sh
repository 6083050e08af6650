# Gemma 3 270M, rotated (inputs form): the one-plane recipe, then the two-plane one, each alone on the GPU.
cd /tmp/w
export PYTHONPATH=/tmp/w/src:/tmp/site
while [ ! -f /root/atq-gpu/gemma3-270m.gguf ]; do sleep 3; done
export ATQ_GGUF_GEMMA3_270M=/root/atq-gpu/gemma3-270m.gguf ATQ_DATA_DIR=/root/atq-gpu/data
echo "gemma staged $(date +%T)"
for recipe in "group 64, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end" \
    "group 128, 2 planes base-3, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end"; do
  n=$(( ${n:-0} + 1 ))
  python3 benchmarks/ptq_table.py --model gemma3-270m --exact --fp-from results/ptq_gemma3_270m.json \
    --only "$recipe" --out "/tmp/r/ptq_gemma_N$n.json" > "/tmp/r/N$n.log" 2>&1
  echo "N$n done $(date +%T)"
done
touch /tmp/r/done
