"""A robot must never receive NaN: values too large for the model (finite in float64, 1e39 or 1e300; or fitting float32 but
overflowing inside, 1e30) and complex values are refused, in process and over icrt_serve, and the refused step leaves no
trace: the next valid steps give exactly the actions of a run that never saw the bad input (issue #28, item 1)."""
import numpy as np
import pytest

from icrt.client import PolicyClient, ServerError
from icrt.config import ICRTError
from icrt.inference import ICRTPolicy
from test_inference import _observation
from test_serve import MAX_LEN, TOKEN, _executed, _run_local, data, server  # noqa: F401 (fixtures)

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


def _bad_inputs(spec, ep, t):
    "(name, observation, executed action) for step t: each one too large, overflowing or complex."
    obs, ex, pose = _observation(spec, ep, t), _executed(spec, ep, t), spec.proprio_keys[0]
    def with_pose(v):
        p = np.array(obs[pose], dtype=np.result_type(np.float64, v)); p[0] = v; return {**obs, pose: p}
    def with_ex(v):
        e = np.array(ex, dtype=np.result_type(np.float64, v)); e[1] = v; return e
    return [("pose 1e39", with_pose(1e39), ex), ("pose 1e300", with_pose(1e300), ex), ("pose 1e30", with_pose(1e30), ex),
            ("pose -3e38", with_pose(-3e38), ex), ("complex pose", with_pose(0.1 + 1e-3j), ex),
            ("executed 1e39", obs, with_ex(1e39)), ("executed 1e300", obs, with_ex(1e300)),
            ("complex executed", obs, with_ex(1j))]


def _episode_with_bad_steps(act, spec, ep):
    "Play STEPS steps; before each valid step from the third on, try every bad input and expect an error."
    out, msgs = [], []
    for t in range(STEPS):
        if t >= 2:
            for name, obs, ex in _bad_inputs(spec, ep, t):
                with pytest.raises((ICRTError, ServerError)) as e: act(obs, ex)
                assert "\n" not in str(e.value), name
                msgs.append(str(e.value))
        out.append(act(_observation(spec, ep, t), _executed(spec, ep, t) if t else None))
    return np.stack(out), msgs


def test_overflow_is_refused_in_process_and_leaves_no_trace(run_dir, data):
    spec, eps = data
    ref = _run_local(run_dir, eps[0], eps[1], spec, STEPS)
    p = ICRTPolicy.from_run(run_dir); p.reset(max_len=MAX_LEN); p.prompt([eps[0]])
    got, msgs = _episode_with_bad_steps(p.act, spec, eps[1])
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, ref)
    assert any("beyond float32" in m for m in msgs) and any("complex" in m for m in msgs)
    assert any("step was undone" in m for m in msgs), msgs  # 1e30 fits float32 and overflows inside the model


def test_overflow_is_refused_over_the_server_and_the_session_goes_on(server, run_dir, data):
    spec, eps = data
    ref = _run_local(run_dir, eps[0], eps[1], spec, STEPS)
    with PolicyClient(server["url"], token=TOKEN) as c:
        c.prompt([eps[0]])
        got, msgs = _episode_with_bad_steps(c.act, spec, eps[1])
    np.testing.assert_array_equal(got, ref)
    assert any("beyond float32" in m for m in msgs) and any("step was undone" in m for m in msgs), msgs


def test_an_overflowing_prompt_keeps_no_prompt(run_dir, data):
    spec, eps = data
    p = ICRTPolicy.from_run(run_dir); p.reset(max_len=MAX_LEN)
    bad = {k: (np.asarray(v) * 1e30 if k == spec.proprio_keys[0] else v) for k, v in eps[0].items()}
    with pytest.raises(ICRTError, match="no prompt is kept"): p.prompt([bad])
    p.prompt([eps[0]])  # a valid prompt afterwards gives the reference actions
    got = np.stack([p.act(_observation(spec, eps[1], t), _executed(spec, eps[1], t) if t else None) for t in range(STEPS)])
    np.testing.assert_array_equal(got, _run_local(run_dir, eps[0], eps[1], spec, STEPS))
