"""Keeps the two listeners that ignore Ray's node address on that address, in every process of a cluster that
cluster.runtime starts on this machine.

`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (cluster.runtime.loopback_env) makes the node address 127.0.0.1 and
Ray's own servers bind it. Measured with `ss -ltnp` (Ray 2.60, torch 2.13), two listeners bind all
interfaces whatever that address is, and neither has a setting to change it:

- a Serve replica's inter-deployment gRPC server: "[::]:0" is hard-coded in ray/serve/_private/replica.py.
  It is unauthenticated and unpickles request metadata, so anyone reaching it runs code.
- torch's TCPStore, the rendezvous of `init_process_group` hosted by rank 0 at MASTER_ADDR:MASTER_PORT:
  its server binds "::" and uses MASTER_ADDR only to connect. Its one way in is `master_listen_fd`, a
  socket the caller has bound.

`bind_node_address` runs first thing in every Ray worker process (Ray's worker_process_setup_hook) and binds
both to the node's address: 127.0.0.1 on the embedded cluster, a loopback alias on tests/test_multinode.py's
nodes. Nothing else changes: the replica's router and torch's clients already connect to that address.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import socket
import sys

WILDCARD_HOSTS = ("[::]", "0.0.0.0", "::", "")
RENDEZVOUS = "torch.distributed.rendezvous"


def bind_node_address() -> None:
    import ray
    from ray._common import tls_utils

    node_ip = ray.util.get_node_ip_address()
    add_port = tls_utils.add_port_to_grpc_server

    def add_port_on_node_address(server, address: str):
        host, _, port = address.rpartition(":")
        return add_port(server, f"{node_ip}:{port}" if host in WILDCARD_HOSTS else address)

    # replica.py imports the function by name when it is first imported, after this hook has run
    tls_utils.add_port_to_grpc_server = add_port_on_node_address
    if RENDEZVOUS in sys.modules:
        _store_on_master_addr(sys.modules[RENDEZVOUS])
    else:
        # torch takes seconds to import: patch it when (if) this worker imports it, not now in every worker
        sys.meta_path.insert(0, _AfterImport(RENDEZVOUS, _store_on_master_addr))


def _store_on_master_addr(rendezvous) -> None:
    """Rank 0 hosts its TCPStore on a socket bound to MASTER_ADDR:MASTER_PORT instead of every interface."""
    create_store = rendezvous._create_c10d_store  # called by both the env:// and tcp:// handlers

    def create_store_on_master_addr(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or rendezvous._torchelastic_use_agent_store():
            return create_store(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        listener = socket.create_server((hostname, port), family=family, backlog=max(128, world_size))
        return rendezvous.TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True,
                                   timeout=timeout, multi_tenant=True, use_libuv=use_libuv,
                                   master_listen_fd=listener.detach())  # the store owns and closes it

    rendezvous._create_c10d_store = create_store_on_master_addr


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is first executed."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below finds the real spec
        spec = importlib.util.find_spec(fullname)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec
