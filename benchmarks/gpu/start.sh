# Call 1 on the device machine: snapshot the tree, start CHAIN (default: gemma_rotated) detached, return.
set -e
rm -rf /tmp/w /tmp/r /tmp/s; mkdir -p /tmp/w /tmp/r /tmp/s
cp -r src benchmarks results pyproject.toml /tmp/w/
cp .gpu/s/*.sh /tmp/s/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
setsid nohup bash "/tmp/s/${1:-gemma_rotated}.sh" > /tmp/r/chain.log 2>&1 < /dev/null &
echo started
