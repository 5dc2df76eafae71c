"""Graph replays of the statistics behind the model's own kernels: a side CUDA stream per device, a layer at a time.

A traced forward on the GPU runs two statistics kernels per traced tensor on the model's stream, ~10% of a 7B
forward at batch 4 and ~30% at batch 1 (bench/RESULTS.md). :class:`Overlap` queues the graphed updates of one
layer and, at the first update of the next layer, issues them on a side stream that first waits for the model's
stream; the model's stream waits for the side stream one layer later, and only then are the queued tensors let
go (the caching allocator may then reuse their memory in stream order). So the statistics of layer L run beside
the model's kernels of layer L + 1, with two stream waits per layer and no ``record_stream``.

What this needs: a traced tensor must not be written in place by the model between its hook and its release.
The first forward of a profile runs under :meth:`Overlap.watching`, deferred like any other, but outside
inference mode (under ``no_grad``) so that every traced tensor has a version counter (shared by views, bumped by
every in-place and ``out=`` write). When the model's stream waits for a layer's replays, the host checks its
tensors' versions: a write issued before that wait may have raced with the replay, so the position is *tainted*
(its statistics of this forward are not trusted: the tracer starts it afresh and traces the first batch again
for it alone, :meth:`~outlierlab.tracing.profiler.Tracer.watched`) and *unsafe* (replayed on the model's
stream from then on; the model's code writes the same positions in place in every forward). Only positions seen
in a watched forward are ever deferred. None of the 12 planted families writes a traced tensor in place, so
their first forward overlaps like the others; a dispatch mode that saw every aten op, tried first, cost ~0.2 s
of host time per forward, and a watched forward that replayed at once cost a synchronous traced forward.
Memory: the queued and held tensors stay alive for up to two layers (about 2 GiB for a 7B model at batch 4 x 2048
tokens in bf16); past ``max_bytes`` (by default an eighth of the device's free memory at its first use)
the queue is issued early, and the watch joins, checks the oldest layer and keeps its positions on the model's
stream (the overlap would hold them longer than the watch checked).
:meth:`~outlierlab.tracing.profiler.Tracer.first_forward` watches only GPU profiles of at least
:attr:`Overlap.MIN_FORWARDS` forwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class Overlap:
    """Statistics replays of many positions, deferred to side streams a layer at a time (see the module doc)."""

    #: profiles of fewer forwards do not watch. Measured with the earlier synchronous watch at 7B bf16 on the
    #: H200, 16 x 2048 tokens: the overlap paid at 4 forwards of batch 4 (1.134 against 1.163 the bare forward)
    #: and not at 1 forward of batch 16 (1.132 against 1.116; bench/RESULTS.md); the deferred watch is to be
    #: measured (`bash bench/ab_gpu.sh overlap` forces it at 1 and 4 forwards)
    MIN_FORWARDS = 4

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes  # None: an eighth of each device's free memory at its first replay
        self.unsafe: set = set()  # positions written in place after their hook: replayed on the model's stream
        self.tainted: set = set()  # unsafe positions whose watched replay may have read a changed tensor
        self.watched: set = set()  # positions seen under watching(): the only ones ever deferred
        self._queue: list[tuple] = []  # (device, key, x, replay) not yet issued
        self._held: dict[torch.device, list[tuple]] = {}  # issued on the side stream, not yet waited for
        self._streams: dict[torch.device, object] = {}
        self._limits: dict[torch.device, int] = {}
        self._layer = None
        self._bytes = 0
        # while watching: per layer, (key, tensor, version) of its replays, checked when the overlap would let
        # that layer's tensors go (two layers on) or when the watched forward ends
        self._seen: list[list[tuple]] | None = None
        self._seen_bytes = 0

    # -- streams (methods so that tests can run the ordering on the CPU with stand-ins) --------------------
    def _side(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def _wait(self, waiter, waited) -> None:
        waiter.wait_stream(waited)

    def _main(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def _on(self, stream):
        return torch.cuda.stream(stream)

    # -- the protocol ----------------------------------------------------------------------------------------
    def replay(self, key: tuple, x: torch.Tensor, replay: Callable[[], None]) -> None:
        """The graphed update of position ``key`` = (layer, name) of ``x``: ``replay()`` issues it on the current
        stream. Queued, or run now (after :meth:`join`) for a position that is written in place or that no
        watched forward has seen (a tracer without a first watched forward, an expert first reached later)."""
        if key[0] != self._layer:
            self.flush()
            self._layer = key[0]
            if self._seen is not None:  # the layer two back would be let go here: its tensors are final
                self._seen.append([])
                while len(self._seen) > 2:
                    self._let_go_oldest(early=False)
        if self._seen is not None and not x.is_inference():  # (an inference tensor has no version counter)
            self.watched.add(key)
            self._seen[-1].append((key, x, x._version))
            self._seen_bytes += _nbytes(x)
            while self._seen_bytes >= self._limit(x.device) and len(self._seen) > 1:
                # past the cap the queue is issued early and the oldest layer let go before its time
                self._let_go_oldest(early=True)
        if key in self.unsafe or key not in self.watched:
            self.join()  # the shared buffers, states and staging rows of a device are used in stream order
            replay()
            return
        self._queue.append((x.device, key, x, replay))
        self._bytes += _nbytes(x)
        if self._bytes >= self._limit(x.device):
            self.flush()

    def _limit(self, device: torch.device) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        if device not in self._limits:
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 << 30
            self._limits[device] = free // 8
        return self._limits[device]

    def flush(self) -> None:
        """Issue the queued replays on their devices' side streams, after the model's stream; the model's stream
        first waits for what the side streams did before, whose tensors are let go."""
        by_device: dict[torch.device, list[tuple]] = {}
        for item in self._queue:
            by_device.setdefault(item[0], []).append(item)
        for dev in set(self._held) | set(by_device):
            main = self._main(dev)
            if self._held.get(dev):
                self._wait(main, self._side(dev))
                self._held[dev] = []
            items = by_device.get(dev)
            if items:
                side = self._side(dev)
                self._wait(side, main)
                with self._on(side):
                    for _, _, _, replay in items:
                        replay()
                self._held[dev] = items
        self._queue, self._bytes = [], 0

    def join(self) -> None:
        """Everything queued issued, and the model's streams wait for it: what the statistics wrote may be read
        on the model's stream from here on (merges, results), and nothing is held."""
        if self.busy():  # else nothing to do (every update of the eager CPU path comes through here)
            self.flush()
            for dev, items in self._held.items():
                if items:
                    self._wait(self._main(dev), self._side(dev))
        self._held = {}

    @property
    def watching_now(self) -> bool:
        """Whether a watched forward is running."""
        return self._seen is not None

    def busy(self) -> bool:
        """Whether any replay is queued or held."""
        return bool(self._queue) or any(self._held.values())

    # -- the first forward: in-place writes ----------------------------------------------------------------
    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """A first forward, deferred as usual but outside inference mode (tensors get version counters): the
        positions whose tensors the model writes in place while the overlap holds them become unsafe and
        tainted; the others may be deferred from then on. Ends joined (nothing in flight)."""
        self.join()
        self._seen, self._seen_bytes = [], 0
        try:
            with torch.inference_mode(False), torch.no_grad():
                yield
        finally:
            self.join()
            for items in self._seen:
                self._check(items)
            self._seen, self._seen_bytes = None, 0

    def take_tainted(self) -> set:
        """The positions whose statistics of the watched forward may have read a tensor written in place (their
        replays are done: :meth:`watching` ends joined); cleared."""
        out, self.tainted = self.tainted, set()
        return out

    def _let_go_oldest(self, early: bool) -> None:
        """The watch's oldest layer checked and let go, where the model's stream has waited for its replays;
        ``early`` (past the cap): everything queued is joined first, and since the overlap would hold these
        tensors longer than the watch checked them, their positions stay on the model's stream."""
        if early:
            self.join()
        items = self._seen.pop(0)
        self._check(items)
        if early:
            self.unsafe.update(key for key, _, _ in items)
        self._seen_bytes -= sum(_nbytes(x) for _, x, _ in items)

    def _check(self, items: list[tuple]) -> None:
        moved = {key for key, x, version in items if x._version != version}
        self.unsafe |= moved
        self.tainted |= moved


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()
