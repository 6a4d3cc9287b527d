"""Closed-loop load: N client threads, each sending its next request as soon as its last returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Answer = TypeVar("Answer")


def closed_loop(clients: int, requests: int, send: Callable[[], Answer]) -> tuple[list[Answer], float]:
    """``requests`` calls of ``send`` from ``clients`` threads: the answers (finishing order), wall seconds."""
    answers: list[Answer] = []
    lock = threading.Lock()
    remaining = [requests]

    def client() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            answer = send()
            with lock:
                answers.append(answer)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return answers, time.perf_counter() - started
