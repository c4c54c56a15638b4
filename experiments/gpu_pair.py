"""Build a random-weight pair with the architectures of Qwen2.5-0.5B and Qwen2.5-1.5B (their public config values,
vocabulary 151,936, tied embeddings) and a word-level tokenizer of the same vocabulary, saved as Hugging Face folders
that codistill_grpo.py loads by path. For timing and memory on a GPU that reaches no hub (README, "On a GPU").

    python experiments/gpu_pair.py OUT_DIR          # -> OUT_DIR/small, OUT_DIR/large, OUT_DIR/train.jsonl
"""
import argparse
import json
import os
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCAB = 151_936
QWEN = {  # config.json of Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B
    "small": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2),
    "large": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2),
}


def tokenizer():
    """Word-level: the words of the prompts, digits and '<tK>' fillers up to 151,936 ids; EOS = pad = Qwen's id."""
    words = ["Please", "reason", "step", "by", ",", "and", "put", "your", "final", "answer", "within", "\\boxed{}",
             ".", "Question", ":", "What", "is", "+", "Answer", "A", "conversation", "between", "User", "Assistant"]
    words += [str(d) for d in range(10)] + ["<unk>"]
    vocab = {w: i for i, w in enumerate(words)}
    eos = 151_643  # <|endoftext|> in Qwen2.5's vocabulary
    for i in range(len(vocab), VOCAB):
        vocab["<|endoftext|>" if i == eos else f"<t{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>")


def main(out):
    tok = tokenizer()
    for name, cfg in QWEN.items():
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=32768,
                             rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=151_643, eos_token_id=151_643,
                             pad_token_id=151_643, **cfg)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        print(name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
        model.save_pretrained(os.path.join(out, name))
        tok.save_pretrained(os.path.join(out, name))
    g = random.Random(0)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for _ in range(2000):
            x, y = g.randint(10, 99), g.randint(10, 99)
            f.write(json.dumps({"problem": f"What is {x} + {y}", "answer": str(x + y)}) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where the pair and its problems go")
    main(p.parse_args().out_dir)
