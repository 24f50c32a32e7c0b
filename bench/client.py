"""Using the portal the way a user does: the HTTP API with a token, then a login to the server."""

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pymysql
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .stack import WEB_PORT

POLL_INTERVAL = 0.02  # seconds between status polls and between login attempts
CREATE_TIMEOUT = 60.0  # an instance that is not connectable by then is a failure, not a number
DELETE_TIMEOUT = 60.0  # without one more instance gone: each delete first takes a snapshot of the data
DELETE_TRIES = 3  # a delete that failed (on a busy host: "Processes … did not exit") is sent again


class Api:
    """A keep-alive JSON client for the portal's API. Not thread-safe: one per thread."""

    def __init__(self, token: str, port: int = WEB_PORT):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Token {token}", "Accept": "application/json"}

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON or None). Reconnects once if the
        server closed the kept-alive connection in between."""
        payload = None if body is None else json.dumps(body).encode()
        headers = self.headers if payload is None else self.headers | {"Content-Type": "application/json"}
        for attempt in range(2):
            try:
                self.connection.request(method, path, body=payload, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.connection.close()
                if attempt:
                    raise
        return response.status, json.loads(data) if data else None

    def close(self) -> None:
        self.connection.close()


def in_parallel(function, *iterables, workers: int) -> list:
    """map(function, *iterables) with `workers` threads; results in order; the first error is raised."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, *iterables))


# Logging in to a server ---------------------------------------------------------------


def log_in(kind: str, config: dict[str, Any], *, timeout: float = 2.0) -> None:
    """One login with `config` (host, port, username, password, database) and a trivial command."""
    if kind == "mysql":
        connection = pymysql.connect(
            host=config["host"],
            port=config["port"],
            user=config["username"],
            password=config["password"],
            database=config.get("database"),
            connect_timeout=timeout,
            # As a client of a server without TLS is set up (`mariadb --skip-ssl`): PyMySQL would
            # otherwise try TLS and load the system's CA certificates on every connect.
            ssl_disabled=config.get("tls", "off") == "off",
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        finally:
            connection.close()
    else:
        client = redis.Redis(
            host=config["host"],
            port=config["port"],
            password=config.get("password"),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        finally:
            client.close()


def wait_for_login(kind: str, config: dict[str, Any], *, deadline: float, poll: float = POLL_INTERVAL) -> None:
    """Try to log in every `poll` seconds until it works; TimeoutError at `deadline` (perf_counter)."""
    while True:
        try:
            log_in(kind, config)
            return
        except Exception as exc:  # any failure means "not yet"
            if time.perf_counter() > deadline:
                raise TimeoutError(f"no {kind} login on port {config['port']}: {exc}") from exc
        time.sleep(poll)


# Creating and deleting instances ------------------------------------------------------


@dataclass
class Created:
    """One instance created through the API and logged in to."""

    kind: str
    id: int
    seconds: float  # from sending the POST to the first successful login with the returned credentials
    api: float  # the POST's round trip
    timings: dict[str, float]  # the steps the worker recorded (queued, data_directory, ...)


def create_and_connect(
    token: str, kind: str, options: dict | None = None, *, poll: float = POLL_INTERVAL, wait: float | None = None
) -> Created:
    """POST a create, poll its status every `poll` seconds until running, fetch its config and log
    in with it. With `wait`, the POST asks to wait that long (`?wait=`): a 201 carries the config,
    and only the login follows."""
    api = Api(token)
    try:
        start = time.perf_counter()
        deadline = start + CREATE_TIMEOUT
        query = "" if wait is None else f"?wait={wait:g}"
        status, body = api.request("POST", f"/api/storage/{kind}/instances{query}", options or {})
        if status not in (201, 202):
            raise RuntimeError(f"POST {kind} answered {status}: {body}")
        posted = time.perf_counter()
        if status == 201:  # running: one round trip, then the login
            wait_for_login(kind, body["config"], deadline=deadline)
            return Created(kind, body["id"], time.perf_counter() - start, posted - start, body["timings"])
        path = f"/api/storage/{kind}/instances/{body['id']}"
        while (detail := api.request("GET", path)[1])["status"] != "running":
            if detail["status"] != "provisioning":
                raise RuntimeError(f"{kind} {body['id']} is {detail['status']}: {detail['status_message']}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{kind} {body['id']} still provisioning after {CREATE_TIMEOUT:g} s")
            time.sleep(poll)
        config = api.request("GET", f"{path}/config")[1]
        wait_for_login(kind, config, deadline=deadline)
        return Created(kind, body["id"], time.perf_counter() - start, posted - start, detail["timings"])
    finally:
        api.close()


def delete_all(token: str, created: list[Created]) -> None:
    """DELETE every instance and wait until the API answers 404 for each (the worker is done); an
    error if DELETE_TIMEOUT passes without one more of them gone."""
    api = Api(token)
    try:
        for instance in created:
            status, body = api.request("DELETE", f"/api/storage/{instance.kind}/instances/{instance.id}")
            if status != 202:
                raise RuntimeError(f"DELETE {instance.kind} {instance.id} answered {status}: {body}")
        deadline = time.perf_counter() + DELETE_TIMEOUT
        for instance in created:
            path, tries = f"/api/storage/{instance.kind}/instances/{instance.id}", DELETE_TRIES
            while (answer := api.request("GET", path))[0] != 404:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{instance.kind} {instance.id} not deleted after {DELETE_TIMEOUT:g} s")
                if answer[1]["status"] == "failed" and tries > 1:  # "Delete failed: …. Try deleting again."
                    tries -= 1
                    api.request("DELETE", path)
                time.sleep(POLL_INTERVAL * 5)
            deadline = time.perf_counter() + DELETE_TIMEOUT  # the workers delete a few at a time
    finally:
        api.close()
