"""Training faults of issue #28: a full disk (a real tmpfs) is called one and leaves no temporary file, resuming from an
older checkpoint never overwrites newer ones, and a run carries its own key names so that it deploys correctly with its
dataset config gone (cameras in a non-default order)."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST
from icrt.data.format import load_dataset_config
from icrt.inference import ICRTPolicy
from icrt.tiny import recipe_flags, scale_down
from icrt.train import RUN_KEYS, RUN_SPACE, train
from icrt.config import parse_args
from test_inference import _observation, raw_episode
from test_train import _main_error, _tree


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread): pass


@pytest.fixture
def tmpfs(tmp_path):
    "A real filesystem of a given size (root only; skipped where mounting is not allowed)."
    mounted = []
    def make(size):
        d = tmp_path / f"fs{len(mounted)}"; d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(d); return d
    yield make
    for d in mounted: subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _flags(assets, out, *extra): return scale_down(recipe_flags("train"), assets, out, FAST + list(extra))


def test_full_disk_is_named_and_leaves_no_temporary(assets, tmpfs, capsys):
    small = tmpfs("1m")  # the run files fit, a checkpoint (~2.7 MiB with its optimiser state) does not
    line = _main_error(_flags(assets, small), capsys)
    assert "no space left on device for checkpoint" in line and "checkpoint-0.pth" in line and "MiB are free" in line, line
    names = sorted(p.name for p in (small / "log_name").iterdir())
    assert "run.yaml" in names and not any(n.endswith(".tmp") or ".tmp" in n for n in names), names
    assert not any(n.startswith("checkpoint") for n in names)
    tiny = tmpfs("8k")   # not even the run files fit
    line = _main_error(_flags(assets, tiny), capsys)
    assert "no space left on device for the run folder" in line, line
    left = [p.name for p in tiny.rglob("*") if p.is_file()]
    assert not any(".tmp" in n for n in left), left


def test_resume_from_an_older_checkpoint_never_overwrites_newer_ones(assets, tmp_path, capsys):
    run = train(parse_args(_flags(assets, tmp_path, "--trainer-cfg.epochs", "3", "--shared-cfg.save-every", "1")))
    before = _tree(run)
    line = _main_error(_flags(assets, tmp_path, "--trainer-cfg.epochs", "4", "--optimizer-cfg.lr", "1e-3",
                              "--shared-cfg.resume", str(run / "checkpoint-0.pth")), capsys)
    assert "holds newer checkpoint(s) checkpoint-1.pth, checkpoint-2.pth" in line and "--logging-cfg.log-name" in line, line
    assert _tree(run) == before
    # the way the message names: continue from the older checkpoint into a new folder
    new = train(parse_args(_flags(assets, tmp_path, "--trainer-cfg.epochs", "2", "--logging-cfg.log-name", "branch",
                                  "--shared-cfg.resume", str(run / "checkpoint-0.pth"))))
    assert (new / "checkpoint-1.pth").is_file() and _tree(run) == before


def test_a_run_deploys_with_its_own_camera_order_when_its_dataset_config_is_gone(assets, tmp_path):
    src = Path(assets.dataset_json)
    cfg = json.loads(src.read_text()); cfg["image_keys"] = cfg["image_keys"][::-1]   # wrist camera first
    swapped = src.with_name("swapped_cameras.json"); swapped.write_text(json.dumps(cfg))
    try:
        flags = _flags(assets, tmp_path)
        flags[flags.index("--dataset-cfg.dataset-json") + 1] = str(swapped)
        run = train(parse_args(flags))
        assert json.loads((run / RUN_KEYS).read_text())["image_keys"] == cfg["image_keys"]
        spec = load_dataset_config(swapped)
        demo, ep = (raw_episode(spec, e) for e in sorted(spec.epi_len)[:2])
        def actions():
            p = ICRTPolicy.from_run(run); p.prompt([demo])
            assert p.image_keys == cfg["image_keys"]
            return np.stack([p.act(_observation(spec, ep, t)) for t in range(5)])
        with_config = actions()
    finally: swapped.unlink()
    np.testing.assert_array_equal(actions(), with_config)   # the dataset config is gone: same cameras, same actions


def test_a_read_only_file_system_is_called_one(assets, tmpfs, capsys):
    ro = tmpfs("1m")
    if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode: pytest.skip("cannot remount read-only")
    line = _main_error(_flags(assets, ro), capsys)
    assert "cannot write to" in line and "(a read-only file system)" in line, line


def test_a_run_without_robot_space_json_keeps_its_own_low_dim_key_names(run_dir, assets, tmp_path):
    "A run from before robot_space.json, trained on a dataset with its own key names, deploys under those names."
    old = tmp_path / "old_run"; shutil.copytree(run_dir, old); (old / RUN_SPACE).unlink()
    keys = json.loads((old / RUN_KEYS).read_text())
    rename = {k: k.replace("observation/", "robot/obs_").replace("action/", "robot/act_") for k in keys["proprio_keys"] + keys["action_keys"]}
    (old / RUN_KEYS).write_text(json.dumps({**keys, **{s: [rename[k] for k in keys[s]] for s in ("proprio_keys", "action_keys")}}))
    spec = load_dataset_config(assets.dataset_json)
    demo, ep = (raw_episode(spec, e) for e in sorted(spec.epi_len)[:2])
    ren = lambda d: {rename.get(k, k): v for k, v in d.items()}
    want = ICRTPolicy.from_run(run_dir); want.prompt([demo])
    p = ICRTPolicy.from_run(old); p.prompt([ren(demo)])
    assert p.space.state_keys == [rename[k] for k in keys["proprio_keys"]]
    for t in range(3): np.testing.assert_array_equal(p.act(ren(_observation(spec, ep, t))), want.act(_observation(spec, ep, t)))
