"""The ``comm`` section for ``comm.name=hivemind`` and its checks (no hivemind import needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dtrain.comm.hivemind.auth import load_run_key


@dataclass
class Config:
    name: str = "hivemind"
    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of running peers; [] starts a new run
    run_id: str = "dtrain"  # keeps runs that share a DHT apart
    run_key_file: str = ""  # file holding the run's shared secret (>= 16 bytes); every peer needs the same
    run_key_env: str = ""  # or: the NAME of an environment variable holding it
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])  # where to listen
    announce_maddrs: list[str] = field(default_factory=list)  # public addresses to announce (behind NAT)
    rank: int = -1  # -1: claim one from the DHT (1 + highest seen)
    min_peers: int = 1  # wait for this many live peers before training starts
    join_timeout: float = 120.0  # seconds to wait for min_peers
    request_timeout: float = 3.0  # one RPC (send, ping); must be < matchmaking_time
    matchmaking_time: float = 30.0  # how long a round waits for a live but slow peer
    heartbeat: float = 1.0  # seconds between membership refreshes; a record lives 4 heartbeats
    maddr_file: str = ""  # if set, write this peer's multiaddrs here (one a line) once it listens


def validate(cfg: Config) -> None:
    if not cfg.run_id or any(c in cfg.run_id for c in "/ \t\n"):
        raise ValueError(f"comm.run_id must be a non-empty word without '/' or spaces, got {cfg.run_id!r}")
    if not cfg.host_maddrs:
        raise ValueError("comm.host_maddrs must list at least one address, e.g. [/ip4/0.0.0.0/tcp/31337]")
    for key in ("request_timeout", "matchmaking_time", "heartbeat", "join_timeout"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"comm.{key} must be > 0, got {getattr(cfg, key)}")
    if cfg.request_timeout >= cfg.matchmaking_time:
        raise ValueError(f"comm.request_timeout ({cfg.request_timeout}) must be < comm.matchmaking_time ({cfg.matchmaking_time})")
    if cfg.min_peers < 1:
        raise ValueError(f"comm.min_peers must be >= 1, got {cfg.min_peers}")
    if cfg.rank < -1:
        raise ValueError(f"comm.rank must be >= 0, or -1 to claim one, got {cfg.rank}")
    for addr in [*cfg.initial_peers, *cfg.host_maddrs]:
        if not str(addr).startswith("/"):
            raise ValueError(f"comm addresses must be multiaddrs like /ip4/1.2.3.4/tcp/31337/p2p/Qm..., got {addr!r}")
    if cfg.run_key_env and not cfg.run_key_env.replace("_", "a").isalnum():
        raise ValueError(f"comm.run_key_env must be the NAME of an environment variable, like DTRAIN_RUN_KEY, got {cfg.run_key_env!r}")
    load_run_key(cfg.run_key_file, cfg.run_key_env)  # a missing, empty or short key fails here, before any peer starts
