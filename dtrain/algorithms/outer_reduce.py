"""The mean of compressed outer updates over all workers, with optional error feedback.

`Compressor` is a codec (`dtrain.algorithms.compress`) plus, with ``error_feedback``, one residual
e per vector it sends (keyed by the caller, e.g. a dtype group of one fragment): each round
u = Δ + β·e, the wire carries C(u), and e ← u − D(C(u)). With β = 1 (the default), over rounds
Σ D(C(u)) = Σ Δ − e_final: nothing is lost, only delayed; β < 1 (SparseLoCo's error-feedback decay)
forgets old unsent signal on purpose, so the residual carries mostly recent outer gradients.
Residuals are kept in fp32 (float64 for float64 vectors). A round whose outer step is skipped on every worker gives its u back (`rollback`), and a
non-finite u never enters a residual.

`start_mean` starts the reduction and returns a `PendingMean`: summable codecs (none, bf16) ride
one all-reduce in the wire dtype; the others are all-gathered, and every worker decodes every
payload and sums in fp32, in rank order, so all workers compute bit-identical means (see the cost
model in `dtrain.comm.base`). A payload that fails to decode makes the whole round unusable on every
worker alike (they all hold the same payloads): ``wait()`` returns None and the caller skips.
"""

from __future__ import annotations

from typing import Any

import torch

from dtrain.algorithms.compress import Codec, DecodeError, codec_of
from dtrain.comm.base import Comm
from dtrain.comm.flat import flatten, group_by_dtype, unflatten_into


class Compressor:
    """``encode(key, Δ)`` → the wire tensor; with error feedback the residual of ``key`` rides along."""

    def __init__(self, codec: Codec, *, error_feedback: bool = False, decay: float = 1.0) -> None:
        self.codec = codec
        self.error_feedback = error_feedback
        self.decay = decay  # β: the share of the residual carried into the next round
        self.residuals: dict[str, torch.Tensor] = {}
        self._sent: dict[str, torch.Tensor] = {}  # key -> u of the round in flight (for rollback)
        self.resets = 0  # residuals dropped because the vector's size changed

    @classmethod
    def of(cls, cfg: Any, codec: Codec | None = None) -> "Compressor":
        """The compressor an algorithm Config's compression and ``error_feedback*`` keys select."""
        return cls(codec or codec_of(cfg), error_feedback=bool(cfg.error_feedback), decay=float(cfg.error_feedback_decay))

    def encode(self, key: str, flat: torch.Tensor) -> torch.Tensor:
        if not self.error_feedback:
            return self.codec.encode(flat)
        dtype = torch.promote_types(flat.dtype, torch.float32)
        e = self.residuals.get(key)
        if e is not None and e.device != flat.device:  # loaded from a checkpoint (on the CPU) into a run on a GPU
            e = self.residuals[key] = e.to(flat.device)
        if e is not None and e.shape != flat.shape:  # the covered parameters changed (LISA): start afresh
            self.resets += 1
            e = None
        u = flat.to(dtype) if e is None else flat.to(dtype) + (e if self.decay == 1 else self.decay * e)
        wire = self.codec.encode(u)
        if bool(torch.isfinite(u).all()):  # a non-finite u leaves e as it was (its wire is refused anyway)
            self._sent[key] = u
            self.residuals[key] = u - self.codec.decode(wire, u.numel()).to(dtype)
        return wire

    def rollback(self, key: str) -> None:
        """The round that sent ``key`` was skipped on every worker: keep all of its u for the next."""
        if key in self._sent:
            self.residuals[key] = self._sent.pop(key)

    def settle(self, key: str) -> None:
        """The round that sent ``key`` was applied."""
        self._sent.pop(key, None)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()},
                "sent": {k: v.clone() for k, v in self._sent.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}
        self._sent = {k: v.clone() for k, v in state.get("sent", {}).items()}

    def tensors(self) -> list[torch.Tensor]:
        """What error feedback keeps (for memory accounting)."""
        return [*self.residuals.values(), *self._sent.values()]


class PendingMean:
    """A reduction under way into ``targets``: `wait_into` writes the mean there (cast to each
    target's dtype), or NaN when the round is unusable, so the caller's finiteness check skips it."""

    def __init__(self, comm: Comm, codec: Codec, targets: list[torch.Tensor], wires: list[torch.Tensor], keys: list[str]) -> None:
        self.codec, self.targets, self.keys = codec, targets, keys
        self.groups = group_by_dtype(targets)
        self.numels = [sum(targets[i].numel() for i in idx) for idx in self.groups]
        self.world_size = comm.world_size
        # What this worker sent, kept apart from ``wires`` (an all-reduce may work on them in place while in
        # flight): `state_dict` saves it, so a resume re-issues the same reduction.
        self.wires = wires
        self.sent = [w.clone() for w in wires] if codec.summable else wires
        if codec.summable:
            self.handle = comm.all_reduce(wires, op="mean", async_op=True)
        elif comm.world_size == 1:
            self.handle = None
        else:
            self.handle = comm.all_gather(wires, finite=False, skip_bad=True, async_op=True)

    def state_dict(self) -> dict[str, Any]:
        return {"wires": [w.clone() for w in self.sent], "keys": list(self.keys)}

    def wait_into(self) -> None:
        got = self.handle.wait() if self.handle is not None else None
        means = self._means(got)
        with torch.no_grad():
            for g, idx in enumerate(self.groups):
                group = [self.targets[i] for i in idx]
                if means is None:
                    for t in group:
                        t.fill_(float("nan"))
                else:
                    unflatten_into(means[g], group)

    def _means(self, got: Any) -> list[torch.Tensor] | None:
        if self.codec.summable:  # reduced in place on the wires
            return self.wires
        rows = got if got is not None else [self.wires]
        sums: list[torch.Tensor] | None = None
        for row in rows:  # rank order: the same sums on every worker
            if len(row) != len(self.wires):  # a rank that sent nothing usable
                return None
            try:
                decoded = [self.codec.decode(w, n) for w, n in zip(row, self.numels)]
            except DecodeError:
                return None
            sums = decoded if sums is None else [s.add_(d) for s, d in zip(sums, decoded)]
        assert sums is not None
        return [s.div_(self.world_size) for s in sums]


def start_mean(comm: Comm, compressor: Compressor, targets: list[torch.Tensor], key: str) -> PendingMean:
    """Encode ``targets`` (one vector per dtype group, error feedback keyed ``key/g``) and start
    averaging them over every worker; `PendingMean.wait_into` writes the mean back into them."""
    keys = [f"{key}/{g}" for g in range(len(group_by_dtype(targets)))]
    wires = [compressor.encode(k, flatten([targets[i] for i in idx])) for k, idx in zip(keys, group_by_dtype(targets))]
    return PendingMean(comm, compressor.codec, targets, wires, keys)


def resume_mean(comm: Comm, codec: Codec, state: dict[str, Any], targets: list[torch.Tensor]) -> PendingMean:
    """Re-issue a reduction saved by `PendingMean.state_dict` (every worker resumes the same ones)."""
    return PendingMean(comm, codec, targets, [w.clone() for w in state["wires"]], list(state["keys"]))
