#!/bin/bash
# Issue 30 on one GPU: benchmarks/edges.py's memory rows in four lanes at once (peaks are
# per process), then its speed rows one at a time, alone on the GPU. Writes under $OUT.
set -u
E="timeout 170 python3 benchmarks/edges.py"
M="memory --out $OUT/edges_memory.jsonl"
S="speed --out $OUT/edges_speed.jsonl --profile-out $OUT/edges_profiles.txt"
L8=meta-llama/Llama-3.1-8B-Instruct
L1=meta-llama/Llama-3.2-1B
Q="--lora-targets q_proj,k_proj,v_proj,o_proj --loop plain --no-keep-outputs"
(
 $E $M $L8 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant --no-zero-init
 $E $M $L8 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant
) > $OUT/lane_a.log 2>&1 &
(
 $E $M $L1 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant --no-zero-init
 $E $M $L1 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode reentrant --no-zero-init
 $E $M $L1 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode reentrant
) > $OUT/lane_b.log 2>&1 &
(
 $E $M $L1 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant
 $E $M $L1 --method full --loop plain --no-keep-outputs --micro-batch 1 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant --no-zero-init
 $E $M $L1 --method full --loop plain --no-keep-outputs --micro-batch 1 --seq-len 2048 --zero 1 --ckpt-mode nonreentrant
) > $OUT/lane_c.log 2>&1 &
(
 $E $M google/gemma-3-1b-it --method lora --micro-batch 32 --seq-len 1664 --zero 0 --ckpt-mode nonreentrant --fused-loss --tag launched-shape
 $E $M $L1 --method full --loop plain --no-keep-outputs --micro-batch 1 --seq-len 2048 --zero 2 --ckpt-mode nonreentrant
 $E $M $L1 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode none --no-zero-init
) > $OUT/lane_d.log 2>&1 &
wait
echo "memory done at $SECONDS s"
$E $S $L8 --method qlora --micro-batch 1 --seq-len 1664 --fused-loss --tag launched-shape
$E $S Qwen/Qwen2.5-0.5B --method lora --loop plain --micro-batch 4 --seq-len 2048 --ckpt-mode nonreentrant
$E $S Qwen/Qwen2.5-7B --method full --loop plain --micro-batch 1 --seq-len 1024
echo "speed done at $SECONDS s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/gpu.txt
cat $OUT/lane_*.log | grep -v "^\[" | tail -60
