#!/usr/bin/env bash
# The GPU checklist (../shared/GPU_CHECKLIST.md; README, "On a GPU") in one run, for a session lent a GPU. No hub
# there: a random-weight pair with Qwen2.5-0.5B / 1.5B's shapes (experiments/gpu_pair.py) stands in for real models.
#     bash experiments/gpu_check.sh OUT_DIR          # about 10 minutes on an H100; figures in OUT_DIR/*.json, *.log
# 0. the KV cache's dtype after a CUDA rollout with --dtype auto, and ms per decoding step, the bf16 sampler against
#    autocast over the fp32 masters;
# 1. one qwen0.5b-sized iteration with --dtype auto at lr 1e-6: the share of each model's weights that moved, step
#    time, peak memory (any path whose weights do not move is a bug);
# 2. decoding near its floor: bench.py's decode part (eager and --compile_decode, batch 1 and the rollout batch);
# 3. the paper's speed claim: bench.py's step ratio at N = 512 and 1024, M = G and M = 14, G = 8.
set -u
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then sed -n '2,/^set -u/p' "$0" | grep '^#' | cut -c3-; exit 0; fi
R=${1:?OUT_DIR}; mkdir -p $R; export HF_HUB_OFFLINE=1
nvidia-smi > $R/nvidia-smi.log 2>&1
python experiments/gpu_pair.py $R/pair > $R/pair.log 2>&1 || { echo "gpu_pair.py failed: $R/pair.log"; exit 1; }
M="--small_model $R/pair/small --large_model $R/pair/large"
python - $R > $R/0-cache.json 2> $R/0-cache.log <<'PY'  # 0.
import json, sys, time, torch
import codistill_grpo as cg
tok = cg.load_tokenizer(sys.argv[1] + "/pair/small")
master = cg.load_model(sys.argv[1] + "/pair/small", torch.float32, "cuda", False)
sampler = cg.new_sampler(master, torch.bfloat16, fsdp=False)
sampler.load_state_dict({k: v.to(torch.bfloat16) for k, v in master.state_dict().items()})
ids, mask = cg.encode_prompts(tok, [f"What is {i} + {i + 7}" for i in range(64)], "boxed", 64, "cuda")
out = {}
for name, model, autocast in [("bf16 sampler", sampler, False), ("autocast over fp32", master, True)]:
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast), torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)  # warm-up
        torch.cuda.synchronize(); t = time.perf_counter()
        o = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=128, min_new_tokens=128, do_sample=False,
                           return_dict_in_generate=True)
        torch.cuda.synchronize()
    cache = getattr(o, "cache", None) or o.past_key_values
    out[name] = dict(ms_per_step=1000 * (time.perf_counter() - t) / 128, keys=str(cache.layers[0].keys.dtype),
                     values=str(cache.layers[0].values.dtype))
print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, **out), indent=1))
PY
python codistill_grpo.py --preset qwen0.5b $M --dataset $R/pair/train.jsonl --eval_size 0 --max_steps 1 --save_every 1 --dtype auto \
  --lr_small 1e-6 --lr_large 1e-6 --output_dir $R/1-step --overwrite > $R/1-step.log 2>&1  # 1.
python - $R > $R/1-moved.json 2>> $R/1-step.log <<'PY'
import json, sys, torch
from safetensors.torch import load_file
R = sys.argv[1]
moved = {}
for name in ["small", "large"]:
    before, after = load_file(f"{R}/pair/{name}/model.safetensors"), load_file(f"{R}/1-step/checkpoint-1/{name}/model.safetensors")
    changed = sum((after[k] != before[k]).sum().item() for k in after)
    moved[name] = changed / sum(v.numel() for v in after.values())
rows = [json.loads(l) for l in open(f"{R}/1-step/metrics.jsonl")]
print(json.dumps(dict(share_of_weights_moved=moved, step=rows[-1]), indent=1))
PY
python bench.py $M --parts decode --lengths 256 --iterations 3 --batch_size 16 --json $R/2-decode.json \
  > $R/2-decode.log 2>&1  # 2.
python bench.py $M --parts steps --lengths 512,1024 --iterations 1 --batch_size 8 --micro_batch_size 8 \
  --gradient_checkpointing --json $R/3-steps.json > $R/3-steps.log 2>&1  # 3.
tail -n 30 $R/*.log; cat $R/*.json | head -200
