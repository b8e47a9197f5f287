"""Run under torchrun (gloo): exercise every Comm call on TorchComm and write what each rank saw."""

import json
import sys
import threading
import time

import torch

from dtrain.comm.base import BadPeerData, PeerTimeout
from dtrain.comm.torch_backend import TorchComm


def main() -> None:
    out = sys.argv[1]
    comm = TorchComm()
    comm.watch_failures(lambda reason: None)  # its thread must be gone after close(), see below
    r, n = comm.rank, comm.world_size
    res: dict = {"rank": r}
    t = [torch.full((3,), float(r)), torch.full((2, 2), float(r + 1))]
    comm.all_reduce(t, op="mean")
    res["mean"] = [t[0].tolist(), t[1].flatten().tolist()]
    m = torch.tensor([float(r)])
    comm.all_reduce([m], op="max")
    res["max"] = m.item()
    h = comm.all_reduce([torch.ones(4)], op="sum", async_op=True)
    h.wait()
    b = [torch.full((5,), float(r))]
    comm.broadcast(b, src=1)
    res["bcast"] = b[0].tolist()
    res["gather"] = [p.decode() for p in comm.all_gather_bytes(f"hi{r}".encode() * (r + 1))]
    # exchange in a ring of pairs: 0<->1, 2<->3 ...
    peer = r ^ 1
    before = comm.stats.copy()
    got = comm.exchange([torch.full((10,), float(r)), torch.full((2,), -float(r))], peer, tag=7)
    res["exchange"] = [got[0][0].item(), got[1][0].item()]
    res["exchange_bytes"] = (comm.stats - before).as_dict()
    # a non-finite reply is rejected
    try:
        comm.exchange([torch.full((3,), float("nan") if r == 0 else 1.0)], peer, tag=8)
        res["nan_rejected"] = False
    except BadPeerData:
        res["nan_rejected"] = True
    comm.barrier()
    res["stats"] = comm.stats.as_dict()
    # silent partner (last: gloo closes a pair after a work timeout): rank 1 never answers tag 9
    if r == 0:
        try:
            comm.exchange([torch.ones(4)], 1, tag=9, timeout=1.0)
            res["timeout"] = False
        except PeerTimeout:
            res["timeout"] = True
    elif r == 1:
        time.sleep(3.0)  # silent past rank 0's timeout, then answers late: the pair must still work
        late = comm.exchange([torch.full((4,), 7.0)], 0, tag=9, timeout=30)
        res["late_reply_delivered"] = late[0].tolist() == [1.0] * 4
    comm.close()
    # A helper thread still inside a torch C++ call at interpreter exit aborts the process
    # ("terminate called without an active exception"): close() must have joined them all.
    res["threads_left"] = [t.name for t in threading.enumerate() if t.name.startswith("dtrain-")]
    json.dump(res, open(f"{out}.{r}", "w"))


if __name__ == "__main__":
    main()
