# wait.sh SECONDS: wait up to SECONDS for the chain to finish, print each log's tail, copy /tmp/r under $OUT.
end=$((SECONDS + ${1:-590}))
while [ $SECONDS -lt $end ] && [ ! -f /tmp/r/done ]; do sleep 5; done
for f in /tmp/r/*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -4; done
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
cp -r /tmp/r/. "$OUT"/ 2>/dev/null; ls "$OUT"
