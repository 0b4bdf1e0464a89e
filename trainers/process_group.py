"""The workers' torch.distributed process group, kept on loopback when Ray is.

Ray Train's ``TorchConfig`` starts the group with ``init_method="env"``: rank 0's
``TCPStore`` server then listens on all interfaces (``*:<port>``, seen with ``ss -ltnp``
during a 2-worker ``raysweep train`` with Ray itself on 127.0.0.1), so anyone who can
reach the machine can talk to the store that every rank trusts. When the master address
Ray picked is a loopback address (the embedded Ray, ``raysweep head`` defaults), every
worker is on this machine, so ``LoopbackTorchConfig``:

- opens rank 0's store socket itself, bound to the loopback address, and hands it to
  ``TCPStore`` (``master_listen_fd``), then ``init_process_group(store=...)``;
- points gloo's (and NCCL's) own connections at the loopback interface
  (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, where the user set none): gloo otherwise
  binds the address the host name resolves to.

On a cluster whose nodes have real addresses, Ray's own ``TorchConfig`` behaviour is used
unchanged (the workers must reach each other there).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import logging

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

# Ray's private parts this needs, on the Ray versions where tests/test_loopback.py passed;
# elsewhere ``torch_config()`` falls back to Ray's public TorchConfig (and says so).
TESTED_RAY_VERSIONS = ("2.60",)
try:
    from ray.train._internal.utils import get_address_and_port
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend
except ImportError:  # another Ray: its private layout differs
    _TorchBackend = None

# Rank 0's listening socket, between opening it and handing it to the store (one per worker process).
_listener: socket.socket | None = None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: not ours to guess
        return False


def loopback_interface() -> str:
    """The name of the loopback network interface (``lo`` on Linux)."""
    for flags in sorted(Path("/sys/class/net").glob("*/flags")):
        try:
            if int(flags.read_text(), 16) & 0x8:  # IFF_LOOPBACK
                return flags.parent.name
        except (OSError, ValueError):
            continue
    return "lo"


def _open_listener(address: str) -> int:
    """On rank 0: a listening socket on ``address`` (loopback), port chosen by the kernel."""
    global _listener
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(128)
    _listener = sock
    return sock.getsockname()[1]


def _setup_loopback_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                                  timeout_s: int) -> None:
    """On every worker: the store on ``address:port`` (rank 0 serves it on its own socket),
    gloo/NCCL on the loopback interface, then the process group."""
    global _listener
    interface = loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        listener, _listener = _listener, None
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend or object):
    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig"):
        address, _ = worker_group.execute_single(0, get_address_and_port)
        backend = _backend_name(worker_group, backend_config)
        if not is_loopback(address) or backend not in ("gloo", "nccl"):
            return super().on_start(worker_group, backend_config)
        port = worker_group.execute_single(0, _open_listener, address=address)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, _setup_loopback_process_group, backend=backend, world_rank=rank, world_size=len(worker_group),
            address=address, port=port, timeout_s=backend_config.timeout_s) for rank in range(len(worker_group))])


def _backend_name(worker_group, backend_config: TorchConfig) -> str:
    """Ray's choice (``_TorchBackend.on_start``): the configured one, else nccl with GPUs, else gloo."""
    if backend_config.backend is not None:
        return backend_config.backend
    resources = worker_group.get_resources_per_worker()
    if resources.get("GPU", 0) > 0:
        return "nccl"
    return "tpu_dist" if resources.get("TPU", 0) > 0 else "gloo"


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group stays on loopback when the master address is
    loopback (see the module docstring); Ray's behaviour otherwise."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend



def torch_config() -> TorchConfig:
    """``LoopbackTorchConfig`` on the tested Ray versions, else Ray's own ``TorchConfig``."""
    if _TorchBackend is not None and ray.__version__.rsplit(".", 1)[0] in TESTED_RAY_VERSIONS:
        return LoopbackTorchConfig()
    logging.getLogger(__name__).warning(
        "Ray %s is not one raysweep keeps the workers' process group on loopback for (tested: %s): "
        "rank 0's TCPStore listens on all interfaces; firewall the training nodes", ray.__version__,
        ", ".join(TESTED_RAY_VERSIONS))
    return TorchConfig()
