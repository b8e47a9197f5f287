"""Pluggable communication backends behind one narrow interface (`Comm`)."""

from dtrain.comm.base import BadPeerData, Comm, CommError, CommStats, Handle, PeerTimeout
from dtrain.comm.local import LocalComm, LocalGroup, run_local

__all__ = [
    "BadPeerData",
    "Comm",
    "CommError",
    "CommStats",
    "Handle",
    "LocalComm",
    "LocalGroup",
    "PeerTimeout",
    "run_local",
]
