"""hivemind backend: peers find each other through a hivemind DHT and talk over its p2p transport.

`comm` holds `HivemindComm` (start with its docstring); `config` the ``comm`` section; `node` the
transport; `rounds` the leader-run collectives; `membership` who is in the run and in which
round; `join` the state a joiner fetches; `auth` the run key; `wire` the frame format.
Importing this package does not import hivemind itself (`connect` does).
"""

from dtrain.comm.hivemind.comm import HivemindComm, connect
from dtrain.comm.hivemind.config import Config, validate

__all__ = ["Config", "HivemindComm", "connect", "validate"]
