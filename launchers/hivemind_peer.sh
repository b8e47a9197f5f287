#!/usr/bin/env bash
# Start or join a hivemind run of `dtrain train` (comm=hivemind). Peers need no coordinator:
# the first one prints its multiaddr, every other one joins through it (or through any peer).
#
#   launchers/hivemind_peer.sh first CONFIG.yaml [key=value ...]
#       starts a new run; prints "hivemind peer rank 0: /ip4/.../tcp/PORT/p2p/12D3Koo..."
#       (listen on a fixed, reachable port with comm.host_maddrs=[/ip4/0.0.0.0/tcp/31337])
#   launchers/hivemind_peer.sh join MULTIADDR CONFIG.yaml [key=value ...]
#       joins: before training starts it is one of the initial peers (set comm.min_peers=N on all
#       of them so they start together); once the run is under way it fetches a live peer's
#       current state (at that peer's next step boundary) and is in step from there.
#   Give every peer the same run key: comm.run_key_file=PATH (or comm.run_key_env=VARNAME);
#       without one, anyone who knows an address and the run id can join and send data.
#
# Every peer runs with resume=true, so that peers started together, peers restarted after a
# crash and peers that join mid-run all go through the same setup (a fresh out_dir simply starts
# from scratch). Keep comm.run_id the same on every peer of a run (and different between runs).
# Ctrl-C / SIGTERM shut the peer down cleanly (no p2pd left behind); even SIGKILL leaves none.
#
# Example, three peers on one machine:
#   launchers/hivemind_peer.sh first configs/noloco.yaml comm.min_peers=3 out_dir=runs/p0 &
#   launchers/hivemind_peer.sh join /ip4/127.0.0.1/tcp/PORT/p2p/ID configs/noloco.yaml comm.min_peers=3 out_dir=runs/p1 &
#   launchers/hivemind_peer.sh join /ip4/127.0.0.1/tcp/PORT/p2p/ID configs/noloco.yaml comm.min_peers=3 out_dir=runs/p2
set -euo pipefail

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 2 ] || usage
mode=$1
shift
PY=${PYTHON:-python}
case "$mode" in
    first)
        exec "$PY" -m dtrain.cli train "$@" comm.name=hivemind "comm.initial_peers=[]" resume=true
        ;;
    join)
        [ $# -ge 2 ] || usage
        addr=$1
        shift
        case "$addr" in
            /*) ;;
            *) echo "hivemind_peer.sh: $addr is not a multiaddr (expected /ip4/HOST/tcp/PORT/p2p/ID)" >&2; exit 2 ;;
        esac
        exec "$PY" -m dtrain.cli train "$@" comm.name=hivemind "comm.initial_peers=[$addr]" resume=true
        ;;
    *)
        usage
        ;;
esac
