"""Forward-only passes of window batches through a PipelineEngine, in lockstep on every rank.

``eval_batch`` holds a whole-world barrier and point-to-point sends between stages, so every rank of
the job must make the same number of calls: callers plan their windows from shapes every rank knows
(the manifest, or a preprocessed header) and pad with ``idle()`` calls up to the largest replica's count.
The first stage supplies the windows; the last stage gets the logits; other stages pass activations.
"""
from __future__ import annotations

import torch


class PipelinedForward:
    """``forward(windows, count)`` -> logits on the last stage (None elsewhere), <= micro_batch windows a call."""

    def __init__(self, engine, micro_batch: int, window: tuple[int, ...], in_channels: int = 1):
        self.engine = engine
        self.micro_batch = micro_batch
        self.window = tuple(window)
        self.in_channels = in_channels

    def __enter__(self) -> "PipelinedForward":
        # Training cached the activation shapes of training patches; windows may differ.
        self.engine.reset_activation_shape()
        # eval_batch logs an eval loss to the monitor from rank 0, which has none without a loss.
        self._monitor = self.engine.monitor.enabled
        self.engine.monitor.enabled = False
        return self

    def __exit__(self, *exc) -> None:
        self.engine.monitor.enabled = self._monitor
        self.engine.reset_activation_shape()

    def _blank(self) -> torch.Tensor:
        return torch.zeros((self.micro_batch, self.in_channels) + self.window)

    def forward(self, windows: torch.Tensor | None, count: int) -> torch.Tensor | None:
        """Run one micro-batch of ``count`` real windows (padded up to the micro-batch).

        ``windows`` matters only on the first stage; the last stage returns ``count`` logits.
        """
        if count > self.micro_batch:
            raise ValueError(f"{count} windows exceed the micro-batch of {self.micro_batch}")
        batch = self._blank()
        if windows is not None and self.engine.is_first_stage():
            batch[: windows.shape[0]] = windows
        dummy_labels = torch.zeros((self.micro_batch,) + self.window, dtype=torch.long)
        self.engine.total_loss = None  # eval_batch adds every output to the last training loss
        out = self.engine.eval_batch(iter([(batch, dummy_labels)]), compute_loss=False, reduce_output=None,
                                     bcast_loss=False, num_micro_batches=1)
        self.engine.total_loss = None
        if not self.engine.is_last_stage():
            return None
        logits = out[0] if isinstance(out, (list, tuple)) else out
        return logits[:count]

    def idle(self) -> None:
        """A call whose result nobody uses, to keep this replica in step with busier ones."""
        self.forward(None, 0)
