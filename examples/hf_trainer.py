"""The Hugging Face Trainer made spot-safe with spotckpt: a tiny GPT-2 built from its config (no
download) trained on synthetic token sequences. Stop it with SIGTERM at any moment and start it
again -- even on a fresh machine, from S3 -- and it resumes from the step it committed.

    spotckpt run -- python examples/hf_trainer.py --local-dir /tmp/ckpt --steps 200
    spotckpt simulate --interruptions 2 --total-steps 120 -- python examples/hf_trainer.py --steps 120
    torchrun --nproc_per_node 2 examples/hf_trainer.py --local-dir /tmp/ckpt    # DDP (gloo on CPU)

The two lines that matter are marked "spotckpt". Checkpoints are committed under --local-dir
(default: $SPOTCKPT_LOCAL_DIR, SageMaker's LocalPath or /opt/ml/checkpoints) and uploaded to
--s3-uri / $SPOTCKPT_S3_URI; the Trainer's own output_dir is scratch space next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from spotckpt.integrations.transformers import SpotckptCallback

VOCAB, SEQ = 128, 32


def say(line: str) -> None:
    """Print one line with one write: under torchrun every rank shares one pipe, and print()'s
    separate write of the newline (unbuffered, as simulate runs it) lets ranks glue lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class TokenDataset(torch.utils.data.Dataset):
    """Synthetic sequences with some structure to learn: each is a seeded random walk mod VOCAB."""

    def __init__(self, n: int = 512, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        steps = torch.randint(1, 4, (n, SEQ - 1), generator=g)
        self.ids = torch.cat([start, start + steps.cumsum(1)], 1) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Report(TrainerCallback):
    """Prints each step's loss (and paces the run with --step-sleep, for demos and tests)."""

    def __init__(self, every: int, sleep: float) -> None:
        self.every, self.sleep = every, sleep

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs and state.global_step % self.every == 0:
            say(f"hf_trainer: step {state.global_step} loss {logs['loss']:.5f}")

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.sleep:
            time.sleep(self.sleep)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (max_steps)")
    p.add_argument("--save-steps", type=int, default=20, help="the Trainer's save_steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (demo pacing)")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--local-dir", default=None)
    p.add_argument("--s3-uri", default=None)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--output-dir", default=None, help="the Trainer's scratch output_dir (default: next to local_dir)")
    p.add_argument("--report", default=None, help="write the loss of every step and the weights digest here (JSON)")
    args = p.parse_args(argv)
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    spot = SpotckptCallback(local_dir=args.local_dir, s3_uri=args.s3_uri, keep_last=args.keep_last)  # spotckpt
    out = Path(args.output_dir or spot.local_dir.parent / f"{spot.local_dir.name}-trainer-output")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                       bos_token_id=0, eos_token_id=0))
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=5, save_steps=args.save_steps,
        save_total_limit=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,  # torchrun: DDP on CPU
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=TokenDataset(),
                      callbacks=[spot, Report(args.print_every, args.step_sleep)])  # spotckpt: the callback
    trainer.remove_callback(PrinterCallback)  # Report prints the loss instead of every log dict
    resume = spot.resume_path()  # after the Trainer: under torchrun it started torch.distributed
    start = 0 if resume is None else json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    main_process = targs.process_index == 0  # several ranks: rank 0 prints and reports
    say(f"hf_trainer[{targs.process_index}]: starting at step {start} of {args.steps}" if targs.world_size > 1
        else f"hf_trainer: starting at step {start} of {args.steps}")
    trainer.train(resume_from_checkpoint=resume)  # spotckpt: exits 0 here after a preemption
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    digest = weights_digest(model)
    if not main_process:
        return 0
    if args.report:
        Path(args.report).write_text(json.dumps({"losses": losses, "weights": digest}))
    loss_digest = hashlib.sha256(repr(sorted(losses.items())).encode()).hexdigest()[:16]
    say(f"hf_trainer: done at step {trainer.state.global_step}; weights {digest}; losses {loss_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
