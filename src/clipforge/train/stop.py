"""Stopping a training run on a signal without losing what it trained.

SIGTERM (a scheduler's preemption notice) or a first Ctrl-C asks the run to stop at its next step boundary, where
the caller writes a checkpoint although none is due; a second Ctrl-C stops at once. Used by ``clipforge train``
(and ``finetune``, ``demo``) and by ``clipforge caption train``.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist


class StopRequest:
    """Install around a training loop; ``agreed()`` at each step boundary says whether to checkpoint and stop.

    Under torchrun the ranks must agree (saving is collective, and a rank that stops alone leaves the others waiting
    in a collective): each step they take the maximum of their flags over a separate CPU (gloo) group, which costs no
    GPU synchronisation. Where gloo is missing they agree at each logging step, over the default group, where the
    ranks meet anyway.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world: int = 1, device: torch.device | None = None):
        self.world, self.device = world, device
        self.signal: str | None = None
        self._previous: dict = {}
        self._group = None

    def install(self) -> None:
        """Take SIGINT and SIGTERM (main thread only: Python delivers signals there); collective under torchrun."""
        if self.world > 1 and dist.is_gloo_available():
            try:
                self._group = dist.new_group(backend="gloo")
            except RuntimeError as exc:  # e.g. no usable network interface for gloo: agree at logging steps instead
                print(f"note: no gloo group for per-step stop agreement ({exc}); a signal stops the run at the next "
                      "--log-every step", file=sys.stderr)
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        """Give the signals back to whoever had them (a notebook's own Ctrl-C handling, say)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def signum(self) -> int | None:
        return signal.Signals[self.signal].value if self.signal else None

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            print(f"\n{self.signal}: stopping after this step with a checkpoint"
                  + (" (Ctrl-C again to quit without one)" if signum == signal.SIGINT else ""), file=sys.stderr)

    def agreed(self, step: int, log_every: int = 1) -> bool:
        """Whether to stop after ``step``: this process was signalled (one process), or any rank was (torchrun)."""
        if self.world == 1:
            return self.signal is not None
        if self._group is None and step % log_every:  # no gloo group: only where the ranks meet anyway
            return False
        device = "cpu" if self._group is not None else self.device  # group None: the default one, on the device
        flag = torch.tensor([self.signal is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
