"""Shared helpers of the serving tests (imported by name; conftest modules are not)."""

from __future__ import annotations

import socket
import threading
import time

import httpx

MEDICAL_TR = "Diyabet hastalarında insülin direnci nasıl tedavi edilir?"
CODING_EN = "How to implement a binary search tree in Python?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``app`` in a background thread on 127.0.0.1."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("status") == "ok":
                    return self
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            time.sleep(0.1)
        raise RuntimeError("the server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def server_settings(assets, **server):
    from r3mes.config import load_config

    overrides = {"model.path": str(assets["model"]), "model.experts_dir": str(assets["experts"]),
                 "generation.max_new_tokens": 8, "server.max_request_bytes": 65536,
                 "server.max_prompt_chars": 4000, "server.max_tokens_limit": 64}
    # Greedy decoding: these tests compare outputs (streamed vs whole, batched vs alone).
    overrides.update({"generation.temperature": 0.0, "generation.repetition_penalty": 1.0})
    overrides.update({f"server.{k}": v for k, v in server.items()})
    return load_config(home=str(assets["home"]), overrides=overrides, environ={})
