"""Fine-tune a tiny GPT-2 with DP-SGD, in micro-batches.

A logical batch is drawn by Poisson sampling (what the accountant assumes), split into
micro-batches that fit in memory, and `cap.clip_` is called on each one: it adds the
clipped per-example gradients into `.grad`, so the micro-batches add up to the logical
batch. Then noise is added once per logical batch and the optimizer steps.

The model is built from a config (no download); it is first trained briefly without
privacy on "public" data, then fine-tuned with DP-SGD on "private" data of a related task.
Both are synthetic sequences: counting upwards from a random start with a fixed step,
the public task with steps 1–3 and the private one with steps 4–6.

    python examples/dp_finetune_transformer.py [--epsilon 8] [--epochs 3] [--micro-batch 8]

Needs `pip install "indigrad[dp]" transformers`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import transformers

import indigrad
from indigrad.dp import GaussianNoise, PoissonSampler, calibrate_noise_multiplier, compute_epsilon

VOCAB, T = 64, 16


def sequences(n: int, steps: tuple[int, ...], seed: int) -> torch.Tensor:
    """``n`` sequences of ``T`` tokens: start + k·step mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.tensor(steps)[torch.randint(0, len(steps), (n, 1), generator=g)]
    return (start + step * torch.arange(T)) % VOCAB  # (n, T)


def token_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits  # (n, T, V)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (n, T-1)


def evaluate(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(token_losses(model, ids).mean())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="expected logical batch size")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--private-examples", type=int, default=2000)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    public = sequences(4096, (1, 2, 3), seed=1)
    private, held_out = sequences(args.private_examples, (4, 5, 6), 2), sequences(512, (4, 5, 6), 3)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(args.pretrain_steps):  # public data: no privacy needed
        ids = public[torch.randint(0, len(public), (64,))]
        token_losses(model, ids).mean().backward()
        opt.step()
        opt.zero_grad()
    print(f"after public pre-training: held-out private-task loss {evaluate(model, held_out):.3f}")

    n = len(private)
    q = args.batch / n
    sampler = PoissonSampler(n, q, steps=args.epochs * round(1 / q), seed=0)
    steps = len(sampler)
    sigma = calibrate_noise_multiplier(
        target_epsilon=args.epsilon, delta=args.delta, sample_rate=q, steps=steps
    )
    noise = GaussianNoise(sigma, args.max_norm, expected_batch_size=q * n, secure=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"DP fine-tuning: {steps} steps, q = {q:.4f}, σ = {sigma:.2f}, C = {args.max_norm}")
    start = time.perf_counter()
    for step, batch in enumerate(sampler, 1):
        idx = torch.tensor(batch, dtype=torch.long)  # the logical batch; its size varies
        for micro in idx.split(args.micro_batch) if len(idx) else [idx]:
            with indigrad.capture(model) as cap:  # adds this micro-batch's clipped sum
                cap.clip_(token_losses(model, private[micro]), max_norm=args.max_norm)
        noise.add_(model)  # once per logical batch: (Σ clipped + N(0, σ²C²)) / (q·n)
        opt.step()
        opt.zero_grad()
        if step % max(1, steps // args.epochs) == 0 or step == steps:
            eps = compute_epsilon(
                sample_rate=q, noise_multiplier=sigma, steps=step, delta=args.delta
            )
            print(
                f"step {step:4d}/{steps}  held-out loss {evaluate(model, held_out):.3f}  "
                f"ε = {eps:.2f} (δ = {args.delta:g})  {time.perf_counter() - start:.0f} s"
            )
    final = {"loss": evaluate(model, held_out), "epsilon": eps}
    return final


if __name__ == "__main__":
    main()
