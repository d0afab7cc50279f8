"""TLS, CORS and fleet errors against real processes (fake engine: no model to load)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import openai
import pytest
import trustme

from tests.support.processes import Process, free_port

pytestmark = [pytest.mark.live, pytest.mark.untimed]


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA made for this test, and a certificate it signed for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = folder / "ca.pem", folder / "key.pem", folder / "cert.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    cert.cert_chain_pems[0].write_to_path(str(paths[2]))
    return paths


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for p in processes:
        p.stop()


@pytest.mark.parametrize("style", ["fastchat-env", "flags"])
def test_tls_serves_https(tls: tuple[Path, Path, Path], started: list[Process], tmp_path: Path, style: str) -> None:
    ca, key, cert = tls
    port = free_port()
    args = ["serve", "--engine", "fake", "--embedding-model-path", "none", "--port", str(port), "--api-keys", "sk-tls"]
    env = {}
    if style == "fastchat-env":
        args.append("--ssl")
        env = {"SSL_KEYFILE": str(key), "SSL_CERTFILE": str(cert)}
    else:
        args += ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    process = Process(args, tmp_path / "serve.log", env=env)
    started.append(process)
    url = f"https://127.0.0.1:{port}"
    process.wait_healthy(url, verify=str(ca))
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key="sk-tls", max_retries=0,
        http_client=httpx2.Client(verify=str(ca)),
    )
    answer = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert answer.choices[0].message.content
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=60)  # the certificate is not trusted by default
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health")


def test_api_without_a_controller_answers_503(started: list[Process], tmp_path: Path) -> None:
    port, nowhere = free_port(), free_port()
    process = Process(["api", "--port", str(port), "--controller-address", f"http://127.0.0.1:{nowhere}"], tmp_path / "api.log")
    started.append(process)
    url = f"http://127.0.0.1:{port}"
    process.wait_healthy(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503
    assert err.value.response.headers["retry-after"]
    response = httpx.get(f"{url}/v1/models", timeout=60)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"
