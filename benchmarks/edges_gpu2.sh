#!/bin/bash
# Issue 30, second call: the ZeRO-3 non-reentrant rows without the allocation trace (the
# traced step crashed in DeepSpeed's linear under non-reentrant recompute), Gemma 3's trace
# with Python frames, and the 8B QLoRA step through zeroplan_varlen as the launch packs it.
set -u
E="timeout 80 python3 benchmarks/edges.py"
M="memory --out $OUT/edges_memory2.jsonl"
L8=meta-llama/Llama-3.1-8B-Instruct
L1=meta-llama/Llama-3.2-1B
Q="--lora-targets q_proj,k_proj,v_proj,o_proj --loop plain --no-keep-outputs"
$E $M $L8 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant --no-zero-init --no-trace > $OUT/l2a.log 2>&1 &
$E $M $L8 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode reentrant --no-zero-init --no-trace > $OUT/l2b.log 2>&1 &
( $E $M $L1 --method lora $Q --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant --no-zero-init --no-trace
  $E $M $L1 --method lora --loop plain --no-keep-outputs --micro-batch 2 --seq-len 2048 --zero 3 --ckpt-mode none --no-zero-init --no-trace ) > $OUT/l2c.log 2>&1 &
( $E $M google/gemma-3-1b-it --method lora --micro-batch 32 --seq-len 1664 --zero 0 --ckpt-mode nonreentrant --fused-loss --tag launched-shape
  $E $M $L1 --method full --loop plain --no-keep-outputs --micro-batch 1 --seq-len 2048 --zero 3 --ckpt-mode nonreentrant --no-zero-init --no-trace ) > $OUT/l2d.log 2>&1 &
wait
echo "memory done at $SECONDS s"
$E speed --out $OUT/edges_speed2.jsonl $L8 --method qlora --micro-batch 1 --seq-len 1664 --fused-loss --varlen --timed 10 --tag launched-shape-varlen
echo "speed done at $SECONDS s"
grep -h "^{" $OUT/l2*.log
