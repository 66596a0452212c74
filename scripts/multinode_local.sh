#!/usr/bin/env bash
# Launch a 2-node run on this one machine: two torchrun invocations (node_rank 0 and 1), one process
# each, rendezvous on 127.0.0.1, through the CLI with the ddp + multinode overlays. On a real
# cluster run the same torchrun line on each node with its own --node_rank and the master's address.
#   bash scripts/multinode_local.sh            # logs in $RUN_DIR/node0.log and node1.log
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-runs/multinode_local}"
DATA_DIR="${DATA_DIR:-data/digits}"
PORT="${PORT:-$(( 29500 + RANDOM % 1000 ))}"
mkdir -p "$RUN_DIR"
# Write the data once, before the nodes start (both nodes would otherwise race to write it).
"$PYTHON" -c "from lightning_frozenbn import DigitsDataModule; DigitsDataModule(root='$DATA_DIR').prepare_data()"
pids=()
for node in 0 1; do
  "$PYTHON" -m torch.distributed.run --nnodes 2 --node_rank "$node" --nproc_per_node 1 \
    --master_addr 127.0.0.1 --master_port "$PORT" \
    -m lightning_frozenbn fit \
      --config "$here/configs/quickstart.yaml" --config "$here/configs/ddp.yaml" --config "$here/configs/multinode.yaml" \
      --trainer.devices 1 --trainer.max_epochs "${EPOCHS:-1}" --trainer.limit_train_batches 4 --trainer.limit_val_batches 2 \
      --trainer.enable_progress_bar false --model.init_args.calibrate_bn 2 \
      --data.init_args.root "$DATA_DIR" --data.init_args.num_workers 0 \
      --trainer.default_root_dir "$RUN_DIR" > "$RUN_DIR/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "node logs: $RUN_DIR/node0.log $RUN_DIR/node1.log (exit $status)"
exit $status
