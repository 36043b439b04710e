"""Adapters and index snapshots over IPFS, by content address.

- :mod:`~r3mes.distribution.cid`: CIDs (``multiformats``) and block verification
- :mod:`~r3mes.distribution.unixfs`: the UnixFS/DAG-PB layout of kubo's ``ipfs add``, computed
  locally (the CIDs ``adapters list`` / ``index list`` show)
- :mod:`~r3mes.distribution.kubo`: client of a kubo node's RPC API (``[ipfs] api``)
- :mod:`~r3mes.distribution.gateway`: trustless HTTP gateway retrieval (raw blocks, CAR)
- :mod:`~r3mes.distribution.publish` / :mod:`~r3mes.distribution.pull`: publish, and pull
  only the missing blocks, verify every one, then install
- :mod:`~r3mes.distribution.sync`: a miner node's periodic pull from the serving node
- :mod:`~r3mes.distribution.embedded`: a loopback kubo node in-process (``r3mes[ipfs]``)
"""

from __future__ import annotations

from typing import Any

from r3mes.distribution.cid import BlockVerificationError, CIDError, parse_cid
from r3mes.distribution.gateway import TrustlessGateway
from r3mes.distribution.kubo import IpfsError, KuboRPC

__all__ = ["BlockVerificationError", "CIDError", "IpfsError", "KuboRPC", "TrustlessGateway",
           "parse_cid", "open_source"]


def open_source(api: str | None = None, gateway: str | None = None,
                home: Any = None) -> KuboRPC | TrustlessGateway:
    """The block source to use: ``api`` (a kubo RPC API), else ``gateway`` (a trustless
    gateway), else the configuration's ``ipfs.api`` / ``ipfs.gateway``.

    Raises :class:`IpfsError` when none is set.
    """
    timeout = 60.0
    if api is None and gateway is None:
        from r3mes.config import load_config

        section = getattr(load_config(home=home), "ipfs", None)
        if section is not None:
            api, gateway, timeout = section.api, section.gateway, section.timeout_s
    if api:
        return KuboRPC(api, timeout_s=timeout)
    if gateway:
        return TrustlessGateway(gateway, timeout_s=timeout)
    raise IpfsError("no IPFS node configured: pass --api URL (a kubo RPC API) or --gateway URL "
                    "(a trustless gateway), or set ipfs.api / ipfs.gateway in the config")
