"""icrt_serve --protocol openpi in a real process, driven by the real `openpi-client` (WebsocketClientPolicy and
ActionChunkBroker): metadata on connect, chunks of the run's shape equal to the in-process policy's with the same
demonstrations, the same chunk after a reset, another task's chunk for another prompt, errors the client raises, and
the server still serving after every bad request (issue #27)."""

import numpy as np
import pytest
pytest.importorskip("openpi_client", reason="openpi's client: pip install --no-deps openpi-client==0.1.2 (.ci/run installs it)")
from openpi_client import msgpack_numpy
from openpi_client.action_chunk_broker import ActionChunkBroker
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.client import connect

from icrt.data.dataset import load_episode
from icrt.data.format import load_dataset_config
from icrt.inference import ICRTPolicy
from conftest import serve_process
from test_inference import _observation, raw_episode

TOKEN, MAX_LEN, LIMIT_MB = "openpi-token", 512, 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


@pytest.fixture(scope="module")
def openpi_server(run_dir, assets, tmp_path_factory):
    "icrt_serve --protocol openpi on the tiny run, the synthetic dataset as its prompt library (one demonstration each)."
    d = tmp_path_factory.mktemp("openpi")
    (d / "token").write_text(TOKEN)
    with serve_process(run_dir, d, "--protocol", "openpi", "--prompts", assets.dataset_json, "--prompt-episodes", 1,
                       "--episode-gap-s", 0, "--token-file", d / "token", "--max-request-mb", LIMIT_MB,
                       "--max-len", MAX_LEN) as (port, log):
        yield {"port": port, "log": log}


@pytest.fixture(scope="module")
def library(assets):
    "The dataset, two tasks' names, and an episode to play (not a prompt demonstration)."
    spec = load_dataset_config(assets.dataset_json)
    tasks = sorted(spec.verb_to_episode)[:2]
    return spec, tasks, raw_episode(spec, spec.verb_to_episode[tasks[0]][1])


def _in_process_chunk(run_dir, spec, task, obs):
    "The chunk an in-process policy gives for `obs` after a prompt of the task's first demonstration."
    p = ICRTPolicy.from_run(run_dir); p.reset(max_len=MAX_LEN); p.prompt([load_episode(spec, spec.verb_to_episode[task][0])])
    p.act(obs)
    return p.last_chunk


def test_openpi_client_gets_metadata_chunks_resets_and_errors(openpi_server, run_dir, library):
    spec, (t0, t1), ep = library
    obs0 = _observation(spec, ep, 0)
    policy = WebsocketClientPolicy("127.0.0.1", openpi_server["port"], api_key=TOKEN)
    meta = policy.get_server_metadata()
    assert meta["protocol"] == "openpi" and meta["action_horizon"] == 4 and meta["action_dim"] == 7
    assert set(meta["prompts"]) == set(spec.verb_to_episode) and meta["observation_keys"][spec.image_keys[0]] == spec.image_keys[0]
    a = policy.infer({**obs0, "prompt": t0})
    assert a["actions"].shape == (4, 7) and a["prompt"] == t0 and a["server_timing"]["infer_ms"] > 0
    np.testing.assert_allclose(a["actions"], _in_process_chunk(run_dir, spec, t0, obs0), atol=1e-5)
    policy.infer(_observation(spec, ep, 1))                                   # the episode goes on (same prompt)
    again = policy.infer({**obs0, "reset": True})                            # a new episode from the end of the prompt
    assert again["step"] == 0 and again["episode"] == a["episode"] + 1
    np.testing.assert_allclose(again["actions"], a["actions"], atol=1e-6)
    other = policy.infer({**obs0, "prompt": t1.upper().replace("_", " ")})  # another task, named loosely
    assert other["prompt"] == t1 and np.abs(other["actions"] - a["actions"]).max() > 1e-4
    np.testing.assert_allclose(other["actions"], _in_process_chunk(run_dir, spec, t1, obs0), atol=1e-5)
    with pytest.raises(RuntimeError, match="icrt_serve: error: unknown prompt 'fly to the moon'"):
        policy.infer({**obs0, "prompt": "fly to the moon"})
    broker = ActionChunkBroker(policy, action_horizon=2)                     # the server still serves, one row per step
    first = broker.infer({**obs0, "prompt": t0, "reset": True})
    second = broker.infer(_observation(spec, ep, 1))                         # from the same chunk, no request
    np.testing.assert_allclose(first["actions"], a["actions"][0], atol=1e-6)
    np.testing.assert_allclose(second["actions"], a["actions"][1], atol=1e-6)
    assert "Traceback" not in openpi_server["log"].read_text()


def test_wrong_token_is_refused_before_the_websocket(openpi_server):
    with pytest.raises(Exception, match="401"): WebsocketClientPolicy("127.0.0.1", openpi_server["port"], api_key="guess")
    with pytest.raises(Exception, match="401"): WebsocketClientPolicy("127.0.0.1", openpi_server["port"])


def _send(ws, raw):
    "Send a frame; the reply as openpi's client reads it: a dict, or the error text."
    ws.send(raw); r = ws.recv(timeout=120)
    return r if isinstance(r, str) else msgpack_numpy.unpackb(r)


def test_bad_requests_get_error_frames_and_the_server_stays_up(openpi_server, library):
    spec, (t0, _), ep = library
    obs = {**_observation(spec, ep, 0), "prompt": t0}
    cam, pose = spec.image_keys[0], spec.proprio_keys[0]
    pk = msgpack_numpy.Packer()
    with connect(f"ws://127.0.0.1:{openpi_server['port']}", max_size=None, compression=None,
                 additional_headers={"Authorization": f"Api-Key {TOKEN}"}) as ws:
        msgpack_numpy.unpackb(ws.recv(timeout=60))                                      # the metadata frame
        ok = lambda: isinstance(_send(ws, pk.pack(obs)), dict)
        assert ok()
        object_array = msgpack_numpy.packb({**{k: v for k, v in obs.items() if k != cam},
                                      cam: {b"__ndarray__": True, b"data": b"x" * 8, b"dtype": "|O", b"shape": [1]}})
        cases = [
            (pk.pack({**obs, cam: obs[cam][..., :2]}), f"camera '{cam}'"),                # a frame of the wrong shape
            (pk.pack({k: v for k, v in obs.items() if k != cam}), "lacks key(s)"),         # a missing key
            (pk.pack({**obs, pose: np.full(6, np.nan)}), "NaN"),                          # NaN
            (pk.pack({**obs, **{f"extra/{i}": 0 for i in range(100_000)}}), "more than 1024"),  # a 100k-key map
            (pk.pack({**obs, cam: np.zeros((50 * 2**20 // 3, 1, 3), np.uint8)}), "larger than the server's limit"),  # 50 MB
            (pk.pack({**{k: v for k, v in obs.items() if k != cam}, 1: 2, 3: 4}), "keys must be strings"),  # integer keys
            (object_array, "only bool, int, uint and float"),                              # an object array
            (b"\xc1 not msgpack", "not msgpack"),
            ("a text frame", "binary frame"),
            (pk.pack({**obs, "reset": "yes"}), "'reset' must be true or false"),
            (pk.pack([1, 2]), "must be a map"),
        ]
        for raw, needle in cases:
            r = _send(ws, raw)
            assert isinstance(r, str) and r.startswith("icrt_serve: error: ") and needle in r, (needle, r[:300])
            assert "\n" not in r and len(r) < 700, (needle, len(r))
            assert ok(), needle                                                           # the next valid request works
    log = openpi_server["log"].read_text()
    assert "Traceback" not in log and "internal error" not in log
