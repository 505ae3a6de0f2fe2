"""Other users on the machine (issue 20, neurolens.serve.access): --require-token puts a token on a loopback
server, the token cookie is named after the port, an explicit Authorization header decides alone (a stale cookie
never beats it), and without a token the Host check stays on, also with --no-token, with configurable names."""
import http.client

import numpy as np
import pytest
from starlette.testclient import TestClient

import serve_fixture
from neurolens.errors import NeurolensError
from neurolens.serve.access import access_for, cookie_name
from neurolens.serve.app import ServeState, build_app
from neurolens.storage.cache import Cache, Record

TOKEN = "the-right-token-123"


def client(port: int = 8765, token=TOKEN, allowed_hosts=None) -> TestClient:
    state = ServeState({}, token=token, allowed_hosts=allowed_hosts, cookie=cookie_name(port))
    return TestClient(build_app(state), base_url=f"http://127.0.0.1:{port}", follow_redirects=False)


def test_a_stale_cookie_never_beats_a_valid_authorization_header():
    app = client()
    cookie = cookie_name(8765)
    assert app.get("/", headers={"Cookie": f"{cookie}=an-old-token-from-yesterday",
                                 "Authorization": f"token {TOKEN}"}).status_code == 200
    assert app.get("/", headers={"Cookie": f"{cookie}={TOKEN}",
                                 "Authorization": "token wrong-token-here"}).status_code == 403   # it decides alone
    assert app.get("/", headers={"Cookie": f"{cookie}={TOKEN}"}).status_code == 200
    assert app.get("/", headers={"Cookie": f"other=1; {cookie}=stale; {cookie}={TOKEN}"}).status_code == 200
    assert app.get("/").status_code == 403


def test_cookie_names_are_per_port():
    one, two = client(8765), client(8766, token="another-token-456")
    answer = one.get(f"/?token={TOKEN}")
    assert answer.status_code == 303
    name, value = answer.headers["set-cookie"].split(";")[0].split("=", 1)
    assert name == "neurolens_token_8765" and value == TOKEN
    assert two.get("/?token=another-token-456").headers["set-cookie"].startswith("neurolens_token_8766=")
    # the browser sends both servers' cookies to each (cookies ignore ports): each reads its own
    both = {"Cookie": f"neurolens_token_8765={TOKEN}; neurolens_token_8766=another-token-456"}
    assert one.get("/", headers=both).status_code == 200 and two.get("/", headers=both).status_code == 200
    assert two.get("/", headers={"Cookie": f"neurolens_token_8765={TOKEN}"}).status_code == 403


def test_host_check_stays_on_with_no_token_and_names_are_configurable():
    open_access = access_for("0.0.0.0", no_token=True)
    assert open_access.token is None and open_access.allowed_hosts is not None
    app = client(token=None, allowed_hosts=open_access.allowed_hosts)
    assert app.get("/", headers={"Host": "rebind.attacker.example:8765"}).status_code == 400
    assert app.get("/", headers={"Host": "10.1.2.3:8765"}).status_code == 200       # an IP address: no rebinding
    assert app.get("/", headers={"Host": "[fe80::1]:8765"}).status_code == 200
    assert app.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    assert app.get("/", headers={"Host": "gpu01.lab:8765"}).status_code == 400

    named = access_for("0.0.0.0", no_token=True, allow_hosts=["gpu01.lab"])
    app = client(token=None, allowed_hosts=named.allowed_hosts)
    assert app.get("/", headers={"Host": "GPU01.lab:8765"}).status_code == 200
    assert app.get("/", headers={"Host": "rebind.attacker.example"}).status_code == 400
    assert "gpu01.lab" in named.warning

    own_name = access_for("gpu01.lab", no_token=True)
    assert client(token=None, allowed_hosts=own_name.allowed_hosts).get(
        "/", headers={"Host": "gpu01.lab:8765"}).status_code == 200
    assert access_for("127.0.0.1").allowed_hosts is not None              # loopback without a token: checked
    assert access_for("0.0.0.0").allowed_hosts is None                    # a token: any name, but the token
    with pytest.raises(NeurolensError, match="--allow-host"):
        access_for("0.0.0.0", no_token=True, allow_hosts=["bad name/with slash"])


def test_require_token_on_loopback(tmp_path):
    access = access_for("127.0.0.1", require_token=True)
    assert access.token and len(access.token) >= 24
    with pytest.raises(NeurolensError, match="contradict"):
        access_for("127.0.0.1", require_token=True, no_token=True)

    cache = Cache(tmp_path / "cache")
    cache.write(cache.path("text-rankings", "cd" * 20, "image_block_4_0", "r"), Record(
        arrays={"top_indices": np.zeros((2, 2), np.int64), "top_scores": np.zeros((2, 2), np.float32),
                "texts": np.array([["a", "b"], ["c", "d"]], dtype=object)}, attrs={"layer": "image_block_4_0"}))
    running = serve_fixture.start_server(cache.root, "--require-token")
    try:
        assert running.url.startswith("http://127.0.0.1:") and "?token=" in running.url
        token = running.url.split("?token=")[1]

        def get(path, headers=None):
            connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
            try:
                connection.request("GET", path, headers=headers or {})
                response = connection.getresponse()
                return response.status, dict(response.getheaders())
            finally:
                connection.close()
        assert get("/")[0] == 403                                       # another local user, without the token
        status, headers = get(f"/?token={token}")
        assert status == 303 and headers["set-cookie"].startswith(f"neurolens_token_{running.port}={token};")
        assert get("/", {"Authorization": f"token {token}"})[0] == 200
    finally:
        serve_fixture.stop_server(running)
