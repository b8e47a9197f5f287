"""The transport under `HivemindComm`: one p2pd daemon, a hivemind DHT for membership, raw RPCs.

`Node` owns an asyncio loop on a background thread. It starts a p2pd daemon (`hivemind.P2P`)
from this process, a `hivemind.DHT` that rides on the same daemon, and a one-shot stream
handler: a caller opens a stream, writes one frame, reads one frame back (`call`). Frames are
length-prefixed raw bytes (see `wire`); hivemind's protobuf and pickle paths are never
used for our data. With a run key (`auth.RunKey`) every frame both ways is sealed and every
membership record signed; a frame or record that does not verify is dropped (logged once per
peer, counted in ``rejected``) before anything parses it.

No orphaned daemons: a watchdog ``sh`` whose stdin is a pipe from this process kills p2pd and
the DHT process as soon as the pipe closes, which the kernel does however this process ends
(SIGKILL included). `close()` shuts everything down in order and then stops the watchdog.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from hivemind import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from dtrain.comm.hivemind.auth import AuthError, ReplayGuard, RunKey
from dtrain.comm.hivemind.wire import NodeError, pack

__all__ = ["Node", "NodeError"]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[bytes]]


REPLY_LINGER_S = 5.0  # how long a handler waits for the caller to close after replying


class Node:
    def __init__(
        self, *, run_id: str, initial_peers: list[str], host_maddrs: list[str], announce_maddrs: list[str],
        handler: Handler, auth: RunKey | None = None, startup_timeout: float = 30.0,
    ) -> None:
        self.run_id = run_id
        self.auth = auth
        self.replays = ReplayGuard()
        self.rejected: dict[str, int] = {}  # peer id -> messages and records dropped: not authenticated
        self.handle_name = f"dtrain.{run_id}.rpc"
        self._handler = handler
        self._closed = False
        self._dht_lock = threading.Lock()
        self._seen: dict[str, tuple[dict[str, Any], float]] = {}  # peer id -> (last record read, its expiration)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hivemind-comm-loop", daemon=True)
        self._thread.start()
        self.p2p: P2P | None = None
        self.dht: DHT | None = None
        self._watchdog: subprocess.Popen | None = None
        try:
            self.p2p = self.run(P2P.create(
                initial_peers=initial_peers or None, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs or None,
                startup_timeout=startup_timeout,
            ), timeout=startup_timeout + 5)
            self.peer_id = self.p2p.peer_id.to_base58()
            self.dht = DHT(initial_peers=initial_peers or None, p2p=self.p2p, start=True, await_ready=True)
            self._start_watchdog()
            self.run(self.p2p.add_binary_stream_handler(self.handle_name, self._on_stream), timeout=startup_timeout)
        except BaseException:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------------
    def run(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the node's loop and wait for it (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _start_watchdog(self) -> None:
        pids = [str(self.p2p._child.pid)] if self.p2p is not None and self.p2p._child is not None else []
        if self.dht is not None and self.dht.pid:
            pids.append(str(self.dht.pid))
        # `read` returns when our end of the pipe closes, i.e. when this process is gone.
        script = f"read _unused; kill -9 {' '.join(pids)} 2>/dev/null; exit 0"
        self._watchdog = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)

    def visible_maddrs(self) -> list[str]:
        assert self.dht is not None
        return [str(m) for m in self.dht.get_visible_maddrs()]

    # -- RPC ------------------------------------------------------------------------
    def reject(self, peer_id: str, reason: str) -> None:
        """Count a message or record from ``peer_id`` that failed authentication; log the first one."""
        if peer_id not in self.rejected:
            log.warning("hivemind: ignoring peer %s..: %s; a peer needs this run's comm.run_key_file/run_key_env "
                        "to take part", peer_id[:16], reason)
        self.rejected[peer_id] = self.rejected.get(peer_id, 0) + 1

    async def _on_stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            frame = await P2P.receive_raw_data(reader)
            sender = info.peer_id.to_base58()
            if self.auth is None:
                reply = await self._handler(sender, frame)
            else:
                try:
                    opened = self.auth.open(frame, sender=sender, receiver=self.peer_id)
                    self.replays.check(sender, opened.seq)
                except AuthError as e:
                    self.reject(sender, str(e))
                    reply = pack({"ok": False, "error": "not authenticated: this run needs its run key"})
                else:
                    answer = await self._handler(sender, opened.frame)
                    reply = self.auth.seal(answer, sender=self.peer_id, receiver=sender, seq=self.auth.next_seq(),
                                           reply_to=opened.seq)
            await P2P.send_raw_data(reply, writer)
            # Close only after the caller has read the reply and closed its end: closing first can
            # let the daemon reset the stream with the reply still in flight (the caller then sees
            # a broken stream for a request that was handled).
            await asyncio.wait_for(reader.read(), REPLY_LINGER_S)
        except asyncio.TimeoutError:
            pass  # the caller keeps its end open: it has had the reply's bytes for REPLY_LINGER_S
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller went away; nothing to answer
        except Exception:  # noqa: BLE001 - a handler bug must not kill the loop
            log.exception("hivemind comm: request handler failed")
        finally:
            writer.close()

    async def _call(self, peer_id: str, frame: bytes) -> bytes:
        assert self.p2p is not None
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), self.handle_name)
        try:
            if self.auth is None:
                await P2P.send_raw_data(frame, writer)
                return await P2P.receive_raw_data(reader)
            seq = self.auth.next_seq()
            await P2P.send_raw_data(self.auth.seal(frame, sender=self.peer_id, receiver=peer_id, seq=seq), writer)
            reply = await P2P.receive_raw_data(reader)
            try:
                opened = self.auth.open(reply, sender=peer_id, receiver=self.peer_id)
            except AuthError as e:
                self.reject(peer_id, f"reply: {e}")
                raise NodeError(f"{peer_id[:12]}.. answered without this run's key") from None
            if opened.reply_to != seq:
                raise NodeError(f"{peer_id[:12]}.. sent a reply to another request")
            return opened.frame
        finally:
            writer.close()

    async def call(self, peer_id: str, frame: bytes, timeout: float) -> bytes:
        """Send one frame to ``peer_id``'s handler and return its reply; NodeError on any failure."""
        try:
            return await asyncio.wait_for(self._call(peer_id, frame), timeout)
        except asyncio.TimeoutError:
            raise NodeError(f"no reply from {peer_id[:12]}.. within {timeout:.1f}s", timed_out=True) from None
        except NodeError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            raise NodeError(f"stream to {peer_id[:12]}.. broke: {type(e).__name__}") from None
        except Exception as e:  # noqa: BLE001 - the daemon bindings raise their own types
            raise NodeError(f"cannot reach {peer_id[:12]}..: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None

    # -- membership records in the DHT ----------------------------------------------
    def members_key(self) -> str:
        return f"dtrain/{self.run_id}/members"

    def publish(self, record: dict[str, Any], ttl: float, *, timeout: float | None = None) -> None:
        """Store this peer's membership record (JSON bytes, never pickled; signed with a run key) until now + ttl.
        ``timeout``: give up (TimeoutError) after this many seconds, e.g. on the way out, when the peers the
        record would be stored on may be shutting down too."""
        if self.dht is None or self._closed:
            return
        until = get_dht_time() + ttl
        if self.auth is not None:
            record = self.auth.sign_record(self.peer_id, record, until)
        blob = json.dumps(record, separators=(",", ":")).encode()
        if not self._dht_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"membership record not stored within {timeout} s: the DHT is busy")
        try:
            self.dht.store(self.members_key(), blob, until, subkey=self.peer_id, return_future=True).result(timeout)
        finally:
            self._dht_lock.release()

    def records(self) -> dict[str, dict[str, Any]]:
        """peer id -> record, for every unexpired record under this run id (garbage skipped).

        One DHT read can miss records (a store that reached only some nodes, a slow node under
        load). A record read before stays until its own expiration unless a read brings one that
        lasts longer (the DHT's own rule per subkey), so a peer drops out when it stops beating or
        says it left, not when one read comes back short.
        """
        if self.dht is None or self._closed:
            return {}
        with self._dht_lock:  # the heartbeat thread and the training thread both read
            found = self.dht.get(self.members_key(), latest=True)
            now = get_dht_time()
            for pid, (rec, until) in _decode_records(found, now).items():
                if self.auth is not None:
                    try:
                        rec = self.auth.verify_record(pid, rec, until)
                    except AuthError as e:
                        self.reject(pid, str(e))
                        continue
                if pid not in self._seen or until >= self._seen[pid][1]:
                    self._seen[pid] = (rec, until)
            self._seen = {pid: (rec, until) for pid, (rec, until) in self._seen.items() if until >= now}
            return {pid: rec for pid, (rec, _) in self._seen.items()}

    # -- shutdown ---------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.p2p is not None:
            try:
                self.run(self.p2p.remove_binary_stream_handler(self.handle_name), timeout=3)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if self.dht is not None:
            try:
                self.dht.shutdown()
            except Exception:  # noqa: BLE001
                pass
        if self.p2p is not None:
            try:
                self.run(self.p2p.shutdown(), timeout=10)
            except Exception:  # noqa: BLE001
                pass
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()
        try:
            self.run(_cancel_pending_tasks(), timeout=5)
        except Exception:  # noqa: BLE001
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
        deadline = time.monotonic() + 5
        while self.dht is not None and self.dht.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)


async def _cancel_pending_tasks() -> None:
    """Cancel and await what still runs on the node's loop (stream handlers, the daemon client's readers):
    left pending, they would be destroyed later by the garbage collector, after the loop is gone, with
    errors logged from whatever thread happens to collect them."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=3)


def _decode_records(found: Any, now: float) -> dict[str, tuple[dict[str, Any], float]]:
    """peer id -> (record, expiration) from a DHT read of the membership key; expired or garbled entries skipped."""
    out: dict[str, tuple[dict[str, Any], float]] = {}
    if found is None or not isinstance(found.value, dict):
        return out
    for subkey, item in found.value.items():
        value, expires = getattr(item, "value", None), getattr(item, "expiration_time", 0.0)
        if not isinstance(subkey, str) or not isinstance(value, bytes) or expires < now:
            continue
        try:
            rec = json.loads(value.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("rank"), int) and not isinstance(rec.get("rank"), bool):
            out[subkey] = (rec, float(expires))
    return out
