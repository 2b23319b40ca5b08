"""Pipelined 3D CNN training: ``deepspeed [--num_gpus N | --hostfile H] --module ds_seg3d.train --data SHARDS --out RUN``.

The command line of the training job; the job itself is ``ds_seg3d.training.loop``.
"""
from __future__ import annotations

import argparse

from ds_seg3d.parallel import preemption, watchdog
from ds_seg3d.paths import DEFAULT_DISCRIMINATOR_CONFIG, DEFAULT_DS_CONFIG, shipped
from ds_seg3d.training import loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_seg3d.train", description="Pipelined 3D CNN training (run under the deepspeed launcher).")
    p.add_argument("--data", required=True, help="shard folder (data_tools build-shards output)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics, monitor, PNGs")
    p.add_argument("--config", help="experiment TOML (defaults: the demo's model and budget)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=str(shipped(DEFAULT_DS_CONFIG)),
                   help="DeepSpeed JSON (optimizer, ZeRO, precision, batch); default: the shipped CPU fp32 one")
    p.add_argument("--stages", type=int, help="pipeline stages (overrides train.stages)")
    p.add_argument("--steps", type=int, help="optimizer steps (overrides train.steps)")
    p.add_argument("--micro-batch", type=int, help="overrides train_micro_batch_size_per_gpu")
    p.add_argument("--grad-accum", type=int, help="overrides gradient_accumulation_steps (micro-batches per step)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--resume-from", metavar="TAG",
                   help="continue from this checkpoint tag instead of the latest (implies --resume)")
    p.add_argument("--adversarial", action="store_true", help="train a discriminator against the segmenter")
    p.add_argument("--discriminator_config", "--discriminator-config", dest="discriminator_config",
                   default=str(shipped(DEFAULT_DISCRIMINATOR_CONFIG)),
                   help="the discriminator engine's own DeepSpeed JSON")
    p.add_argument("--adversarial_weight", "--adversarial-weight", dest="adversarial_weight", type=float,
                   help="lambda of the adversarial term (overrides adversarial.weight)")
    p.add_argument("--discriminator-device", help="device of the discriminator (e.g. cuda:1; default: the rank's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any experiment field, e.g. --set model.params.base_width=8")
    p.add_argument("--watchdog-s", type=float, metavar="SECONDS",
                   help=f"end the job when a rank makes no progress this long (a peer hung or died); "
                        f"default ${watchdog.ENV} or {watchdog.DEFAULT_BOUND_S:g}; 0 turns it off")
    p.add_argument("--preempt-signals", default=",".join(preemption.DEFAULT_SIGNALS), metavar="SIG[,SIG...]",
                   help="signals that make every rank finish its step, save a checkpoint and exit (default "
                        "%(default)s; also the end of the deepspeed command on a single node)")
    p.add_argument("--preempt-exit-code", type=int, default=preemption.EXIT_CODE,
                   help="exit status after such a save (default %(default)s, EX_TEMPFAIL: run again with --resume)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    args.resume = args.resume or args.resume_from is not None
    return args




def train(argv: list[str] | None = None):
    """The job on this rank: (exit code, segmenter engine, AdversarialTraining or None); see ``loop.run``."""
    return loop.run(parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return train(argv)[0]


if __name__ == "__main__":
    from ds_seg3d.parallel.teardown import exit_rank

    exit_rank(main())  # skips interpreter finalization, where gloo state could abort the finished rank
