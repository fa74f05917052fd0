"""Hugging Face transformers as the peer for our logits (shared by the live test and the
fixture script). Imports torch and transformers only when called.

Each case: a random-weight checkpoint (fixed seed, any GPT-2 shape), a prompt, and
20 tokens fed one at a time through HF's own KV cache (past_key_values).
"""

from __future__ import annotations

import numpy as np

from refcomplete.checkpoint import GPT2Config

CASES = {  # name -> (config, seed)
    "l2_c64_h4": (GPT2Config(n_layer=2, n_embd=64, n_head=4, n_ctx=64), 1),
    "l3_c96_h3": (GPT2Config(n_layer=3, n_embd=96, n_head=3, n_ctx=80, layer_norm_epsilon=1e-6), 2),
    "l1_c128_h8": (GPT2Config(n_layer=1, n_embd=128, n_head=8, n_ctx=48), 3),
    "gpt2_124m": (GPT2Config(), 4),
}
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 15496]
STEPS = [11, 995, 0, 50256, 1, 2, 3, 262, 318, 257, 1332, 13, 198, 198, 40, 716, 50255, 30, 20, 628]
COLUMNS = np.random.default_rng(0).choice(50257, size=2048, replace=False)  # stored subset
GREEDY_PROMPTS = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "To be, or not to be"]
GREEDY_TOKENS = 40


def hf_greedy(directory, prompts=GREEDY_PROMPTS, n=GREEDY_TOKENS) -> list[list[int]]:
    """HF generate() greedy continuations (no EOS stop), token ids."""
    import torch
    from transformers import GPT2LMHeadModel

    from refcomplete.tokenizer import get_tokenizer

    model = GPT2LMHeadModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    out = []
    for text in prompts:
        ids = torch.tensor([get_tokenizer().encode(text)])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=50256)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def our_greedy(model, prompts=GREEDY_PROMPTS, n=GREEDY_TOKENS) -> list[list[int]]:
    out = []
    for text in prompts:
        sess = model.session(model.tokenizer.encode(text), rows=1, max_new_tokens=n)
        logits, toks = sess.prefill(), []
        for _ in range(n):
            toks.append(int(logits[0].argmax()))
            logits = sess.step([0], [toks[-1]]) if len(toks) < n else logits
        out.append(toks)
    return out


def hf_logits(directory) -> tuple[np.ndarray, np.ndarray]:
    """HF logits: prefill [T, V] of PROMPT, then [20, V] from 20 cached decode steps."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), use_cache=True)
        prefill, past = out.logits[0].numpy(), out.past_key_values
        steps = []
        for tok in STEPS:
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1].numpy())
    return prefill, np.stack(steps)


def our_logits(model) -> tuple[np.ndarray, np.ndarray]:
    sess = model.session(PROMPT, rows=1, max_new_tokens=len(STEPS))
    prefill = sess.prefill(all_positions=True)
    return prefill, np.stack([sess.step([0], [t])[0] for t in STEPS])
