"""`icrt_compress` and `icrt_convert` when the machine fails them: a pool worker killed (as the out-of-memory killer
does), a full disk, a kill at the commit point or in the middle of `--overwrite`'s swap. Each ends in one line that
says what to do, keeps what was written before byte-identical, and leaves an output folder that `--resume` finishes.

The full disk is a real small tmpfs, mounted in a private mount namespace (`unshare -rm`), so nothing on the machine
changes; where that is not allowed the tests fall back to a disk that only the tools' free-space check sees
(tests/slow_tool.py, ICRT_TEST_DISK)."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from icrt.data.compress import compress
from icrt.data.convert import convert, write_robomimic_example
from icrt.data.format import check_dataset, load_dataset_config
from icrt.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
KEEP_FREE = getattr(__import__("icrt.data.format").data.format, "KEEP_FREE", 1 << 20)   # what a writer leaves free
TOOLS = ["compress", "convert"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    "{tool: its input}: a synthetic dataset (2 tasks x 4 episodes, 64x80) and a robomimic file (8 demos, 32x40)."
    d = tmp_path_factory.mktemp("sources")
    raw = make_synthetic_dataset(d / "raw", num_tasks=2, episodes_per_task=4, height=64, width=80, min_len=30, max_len=34,
                                 progress=False)
    write_robomimic_example(d / "many.hdf5", demos=8, steps=30)
    return {"compress": Path(raw), "convert": d / "many.hdf5"}


def env(**extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", **extra)


def tool(which, *args, slow=False, **extra_env):
    "`icrt_<which> ARGS` (tests/slow_tool.py) in its own process group; `slow`: every shard takes 0.5 s more."
    e = env(ICRT_TEST_SHARD_S="0.5" if slow else "0", **extra_env)
    return subprocess.Popen([sys.executable, "-m", "slow_tool", which, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, start_new_session=True)


def finish(p, timeout=120):
    "(rc, stdout, stderr) of `p`; a run that hangs past `timeout` is killed and fails the test."
    try: o, e = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); o, e = p.communicate()
        pytest.fail(f"still running after {timeout} s (hung); stderr: {e[-2000:]}")
    return p.returncode, o, e


def run(which, *args, **extra_env): return finish(tool(which, *args, **extra_env))


def one_line(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrt_"), err
    for n in needles: assert n in lines[0], err


def wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: pytest.fail(f"waited {timeout} s")
        time.sleep(0.05)


def hashes(folder):
    "{relative path: sha256} of every file under `folder`."
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def contents(cfg):
    "{(episode, key): array} of every dataset of a made dataset."
    spec, out = load_dataset_config(cfg), {}
    for path, names in zip(spec.dataset_path, spec.hdf5_keys):
        with h5py.File(path) as f:
            for e in names:
                f[e].visititems(lambda k, o: out.__setitem__((e, k), o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def same_dataset(a, b):
    x, y = contents(a), contents(b)
    assert x.keys() == y.keys()
    for k in x:
        if x[k].dtype == object: assert all(np.array_equal(u, v) for u, v in zip(x[k], y[k])), k
        else: np.testing.assert_array_equal(x[k], y[k], err_msg=str(k))


def reference(which, src, out, shard_episodes):
    "The dataset made in one uninterrupted run, in-process."
    f = compress if which == "compress" else convert
    return f(src, out, shard_episodes=shard_episodes, progress=False)["config"]


def pool_workers(pid):
    "Pids of the spawned pool workers among the children of `pid` (not multiprocessing's resource tracker)."
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit(): continue
        try: stat, cmd = (d / "stat").read_text(), (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError: continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and "spawn_main" in cmd: out.append(int(d.name))
    return out


# ---------------------------------------------------------------- item 2: a killed pool worker
@pytest.mark.parametrize("which", TOOLS)
def test_killed_worker_stops_with_the_resume_hint(which, sources, tmp_path):
    "SIGKILL of one pool worker mid-run (an out-of-memory kill): one line naming it and --resume, not a hang."
    src, out, part = sources[which], tmp_path / "out", tmp_path / "out.partial"
    p = tool(which, src, out, "--workers", "2", "--shard-episodes", "1", slow=True)
    wait_for(lambda: list(part.glob("part-*.hdf5")) or p.poll() is not None)
    workers = pool_workers(p.pid)
    assert workers, "no pool worker found"
    os.kill(workers[0], signal.SIGKILL)
    rc, _, err = finish(p, timeout=60)
    assert rc == 1, err
    one_line(err, "worker", "SIGKILL", str(part), "--resume")
    kept = {k: v for k, v in hashes(part).items() if k.startswith("part-") and k.endswith(".hdf5")}
    assert kept and not out.exists()
    rc, o, err = run(which, src, out, "--resume", "--workers", "1", "--shard-episodes", "1")
    assert rc == 0 and "kept from the interrupted run" in o and not part.exists(), err
    assert {k: v for k, v in hashes(out).items() if k in kept} == kept           # finished shards: byte-identical
    assert check_dataset(out / "dataset_config.json")[1] == []
    same_dataset(out / "dataset_config.json", reference(which, src, tmp_path / "ref", 1))


# ---------------------------------------------------------------- item 10: the commit point
# (work_folder, check_state and swap_in are one code path for both tools: tested through icrt_compress)
def test_kill_at_the_commit_then_resume_with_other_arguments(sources, tmp_path):
    "Killed right after state.json is removed, then --resume with another shard size: never a dataset with holes."
    which = "compress"; src, out = sources[which], tmp_path / "out"
    rc, _, err = run(which, src, out, "--workers", "1", "--shard-episodes", "1", ICRT_TEST_KILL_AFTER="unlink:state.json")
    assert rc == -signal.SIGKILL, err
    rc, _, err = run(which, src, out, "--resume", "--workers", "1", "--shard-episodes", "8")
    if rc == 0:   # a resume may finish the work, but only into the complete dataset
        assert check_dataset(out / "dataset_config.json")[1] == []
        assert len(load_dataset_config(out / "dataset_config.json").epi_len) == 8
    else: one_line(err, str(out))
    assert rc in (0, 1), err
    summary, problems = check_dataset(out / "dataset_config.json")
    assert problems == [] and summary["episodes"] == 8


def test_resume_without_the_state_file_is_refused(sources, tmp_path):
    "Finished shards whose state.json is gone cannot be checked against the arguments: refused, never reused blindly."
    which = "compress"; src, out, part = sources[which], tmp_path / "out", tmp_path / "out.partial"
    p = tool(which, src, out, "--workers", "1", "--shard-episodes", "1", slow=True)
    wait_for(lambda: list(part.glob("part-*.hdf5")) or p.poll() is not None)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    (part / "state.json").unlink()
    before = hashes(part)
    rc, _, err = run(which, src, out, "--resume", "--workers", "1", "--shard-episodes", "8")
    assert rc == 1, err
    one_line(err, str(part), "--overwrite")
    assert hashes(part) == before and not out.exists()
    rc, _, err = run(which, src, out, "--overwrite", "--workers", "1", "--shard-episodes", "8")
    assert rc == 0 and check_dataset(out / "dataset_config.json")[1] == [], err


# ---------------------------------------------------------------- item 11: a kill in --overwrite's swap
@pytest.mark.parametrize("kill_after", ["rename:out", "rename:out.partial"])
def test_kill_in_the_overwrite_swap_leaves_nothing_behind(kill_after, sources, tmp_path):
    "A kill between the renames of --overwrite: the next runs restore or finish OUT and leave no hidden old folder."
    which = "compress"; src, out = sources[which], tmp_path / "out"
    reference(which, src, out, 4)
    old = hashes(out)
    rc, _, err = run(which, src, out, "--overwrite", "--shard-episodes", "8", ICRT_TEST_KILL_AFTER=kill_after)
    assert rc == -signal.SIGKILL, err
    rc, _, err = run(which, src, out, "--shard-episodes", "8")        # the user runs the command again
    if kill_after == "rename:out":          # killed with OUT moved away: the old OUT is back, the new one resumable
        assert rc == 1 and hashes(out) == old, err
        one_line(err, "pass --resume")
        rc, _, err = run(which, src, out, "--resume", "--shard-episodes", "8")
        assert rc == 0, err
    else:                                   # killed once the new OUT was in place: it is complete
        assert rc == 1, err
        one_line(err, "already exists; pass --overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert check_dataset(out / "dataset_config.json")[1] == []
    assert len(load_dataset_config(out / "dataset_config.json").dataset_path) == 1      # the new one (8 per shard)


# ---------------------------------------------------------------- item 3: a full disk
def _mount_works(tmp):
    "Can this machine mount a tmpfs in a private mount namespace (`unshare -rm`, root or user namespaces)?"
    if not shutil.which("unshare"): return False
    (tmp / "m").mkdir(exist_ok=True)
    r = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp / "m")], capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def disk_mode(tmp_path_factory):
    "'tmpfs' (a real small filesystem) where it can be mounted, else 'fake' (only the tools' free-space check sees it)."
    if os.environ.get("ICRT_TEST_DISK_MODE") in ("tmpfs", "fake"): return os.environ["ICRT_TEST_DISK_MODE"]
    return "tmpfs" if _mount_works(tmp_path_factory.mktemp("probe")) else "fake"


def drive(plan_file):
    """Run a full-disk scenario (in the mount namespace when the disk is a tmpfs): fill, grow, resume; record each step.
    `python -c "import test_datatools_faults as t; t.drive(PLAN)"`; the plan and the record are JSON files."""
    plan = json.loads(Path(plan_file).read_text()); mnt, which = Path(plan["mnt"]), plan["which"]
    mnt.mkdir(parents=True, exist_ok=True)
    disk = {}
    if plan["mode"] == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={plan['small'] // 1024}k", "tmpfs", str(mnt)], check=True)
    else: disk = dict(ICRT_TEST_DISK=f"{mnt}:{plan['small']}")
    if plan["old"]: shutil.copytree(plan["old"], mnt / "out")
    rec = dict(before=hashes(mnt))
    rec["first"] = run(which, plan["src"], mnt / "out", *plan["args"], **disk); rec["after_first"] = hashes(mnt)
    if plan["mode"] == "tmpfs": subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
    rec["second"] = run(which, plan["src"], mnt / "out", "--resume", *plan["resume_args"]); rec["after_second"] = hashes(mnt)
    if (mnt / "out").is_dir(): shutil.copytree(mnt / "out", plan["keep"])
    Path(plan["record"]).write_text(json.dumps(rec))


def full_disk(mode, tmp_path, which, src, args, resume_args, old=None, room=0):
    "Run `icrt_<which> SRC MNT/out ARGS` on a disk with `room` bytes free (after `old`, copied to MNT/out), then --resume."
    used = sum(p.stat().st_size for p in Path(old).rglob("*") if p.is_file()) if old else 0
    plan = dict(mode=mode, mnt=str(tmp_path / "mnt"), which=which, src=str(src), args=list(map(str, args)),
                resume_args=list(map(str, resume_args)),
                old=str(old) if old else None, small=used + room, keep=str(tmp_path / "kept"), record=str(tmp_path / "record.json"))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-c", "import sys, test_datatools_faults as t; t.drive(sys.argv[1])", str(tmp_path / "plan.json")]
    if mode == "tmpfs": cmd = ["unshare", "-rm", *cmd]
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp_path / "record.json").read_text())


def part_sizes(cfg):
    "Bytes of each part file of a made dataset."
    return [p.stat().st_size for p in sorted(Path(cfg).parent.glob("part-*.hdf5"))]


def test_full_disk_compress_is_one_line_and_resumable(disk_mode, sources, tmp_path):
    "icrt_compress with 2 workers fills the disk: one line (folder, space, --resume), no crash, finished shards kept."
    ref = reference("compress", sources["compress"], tmp_path / "ref", 2)
    sizes = part_sizes(ref)
    rec = full_disk(disk_mode, tmp_path, "compress", sources["compress"], ["--workers", "2", "--shard-episodes", "2"],
                    ["--workers", "1", "--shard-episodes", "2"], room=KEEP_FREE + sizes[0] + sizes[1] // 2)
    rc, _, err = rec["first"]
    assert rc == 1, err
    one_line(err, f"{tmp_path / 'mnt' / 'out.partial'}: disk full", "free", "needed", "--resume")
    left = rec["after_first"]
    assert len(left) < 2 + len(sizes) and not any(k.endswith(".tmp") for k in left) and "out.partial/state.json" in left
    rc, o, err = rec["second"]
    assert rc == 0, err
    kept = {k.replace("out.partial/", "out/"): v for k, v in left.items() if k.startswith("out.partial/part-")}
    assert {k: rec["after_second"][k] for k in kept} == kept                          # finished shards: byte-identical
    assert check_dataset(tmp_path / "kept" / "dataset_config.json")[1] == []
    same_dataset(tmp_path / "kept" / "dataset_config.json", ref)


def test_full_disk_convert_overwrite_keeps_the_old_output(disk_mode, sources, tmp_path):
    "icrt_convert --overwrite fills the disk: the old OUT stays byte-identical, one line, and --resume finishes."
    ref = reference("convert", sources["convert"], tmp_path / "ref", 2)
    old = reference("convert", sources["convert"], tmp_path / "old", 8)
    sizes = part_sizes(ref)
    rec = full_disk(disk_mode, tmp_path, "convert", sources["convert"], ["--workers", "1", "--shard-episodes", "2", "--overwrite"],
                    ["--workers", "1", "--shard-episodes", "2"], old=Path(old).parent, room=KEEP_FREE + sizes[0] + sizes[1] // 2)
    rc, _, err = rec["first"]
    assert rc == 1, err
    one_line(err, f"{tmp_path / 'mnt' / 'out.partial'}: disk full", "free", "needed", "--resume", "1 of 4 shard(s) finished")
    was = {k: v for k, v in rec["before"].items()}
    assert {k: rec["after_first"].get(k) for k in was} == was                         # the old OUT: byte-identical
    assert not any(k.endswith(".tmp") for k in rec["after_first"])
    rc, o, err = rec["second"]
    assert rc == 0 and "resumed: 1 of 4 shard(s) kept" in o, err
    same_dataset(tmp_path / "kept" / "dataset_config.json", ref)
