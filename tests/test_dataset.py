"""SequenceDataset on icrt.tiny's toy dataset, whose values encode (episode, step): what the notebook 06_data.dataset
does not hold well (bad input, the split of the published code, worker processes, the GPU path, the bench CLI) and the
options it does not run (absolute actions and action noise, layouts, quaternions, grouping, repeats, goal conditioning)."""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icrt.config import ConfigError, DatasetConfig, SharedConfig
from icrt.data.dataset import DistributedSubEpochSampler, SequenceDataset, load_episode
from icrt.data.format import DatasetError
from icrt.data.image import preprocess_batch
from icrt.tiny import toy_dataset

DC = dict(input_size=(3, 24, 24), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.9)


@pytest.fixture(scope="module")
def toy(tmp_path_factory): return toy_dataset(tmp_path_factory.mktemp("toy"))


def make(cfg, split="train", seq_length=40, K=4, split_file=None, shared=None, **kw):
    return SequenceDataset(DatasetConfig(dataset_json=str(cfg), **kw),
                           SharedConfig(seq_length=seq_length, num_pred_steps=K, **(shared or {})),
                           split=split, split_file=split_file, data_config=DC)


def steps_of(s):
    "(T, K, 2) episode index and step of every proprio entry."
    return np.round(s["proprio"][..., :2].numpy() * [1, 100]).astype(int)


def lengths_of(ds, eps): return np.array([ds.spec.epi_len[f"episode_{e}"] for e in eps])


def test_absolute_actions_and_action_noise(toy):
    a = make(toy, proprio_noise=0.0, shared={"use_delta_action": False})
    s = a[2]
    st = steps_of(s); L = lengths_of(a, st[:, 0, 0])
    tgt = np.minimum(st[:, 0, 1:2] + np.arange(4), (L - 1)[:, None]) + 1
    np.testing.assert_allclose(s["action"][..., 1].numpy(), tgt / 100, atol=1e-6)
    n = make(toy, action_noise=0.05, proprio_noise=0.0, shared={"use_delta_action": False})[2]
    assert (n["action"][..., :3] - s["action"][..., :3]).abs().max() > 1e-3
    torch.testing.assert_close(n["action"][..., 9:], s["action"][..., 9:])           # gripper and end flag untouched


def test_masks_on_samples(toy):
    ds = make(toy, num_weighted_steps=5, proprio_noise=0.0, gpu_preprocess=True)
    checked = 0
    for i in range(0, len(ds), 3):
        s = ds[i]; pm, wm = s["prompt_mask"].numpy(), s["weight_mask"].numpy()
        eos = s["action"][:, 0, -1].numpy().astype(bool)
        bounds = [t for t in np.flatnonzero(eos) if t < 39]
        if not bounds:
            assert pm.sum() == 0 and (wm == 1).all(); continue
        first = int(np.argmax(pm)); b = first - 1
        assert b in (bounds[1:] if len(bounds) > 1 else bounds)                    # never the first of several
        np.testing.assert_array_equal(pm, (np.arange(40) > b).astype(np.float32))
        starts = [t + 1 for t in np.flatnonzero(eos) if b <= t < 39]               # trajectory starts after it
        expect, ends = np.zeros(40, np.float32), np.flatnonzero(eos)
        for q in starts:                                   # first 5 steps of each trajectory, clipped at its end
            end = ends[ends >= q][0] if (ends >= q).any() else 39
            expect[q:q + min(5, end - q + 1)] = 1
        np.testing.assert_array_equal(wm, expect)
        checked += 1
    assert checked > 3


def test_rebalance_counts_and_grouping(tmp_path):
    cfg = toy_dataset(tmp_path, task_grouping={"ratios": {"big": 2.0}, "tasks": {"big": ["reach"]}})
    ds = make(cfg, num_repeat_traj=1)
    assert ds.counts == {"reach": 10, "push": 5, "pick": 5}                          # median 5, reach x2
    for e in range(3):
        ds.shuffle_dataset(e)
        drawn = {}
        for si in ds.plan.seg_episode: t = ds.task_of(ds.episodes[si]); drawn[t] = drawn.get(t, 0) + 1
        assert drawn == ds.counts
    off = make(cfg, rebalance_tasks=False, num_repeat_traj=1)
    assert sorted(ds_e for ds_e in off.episodes) == sorted(off.episodes[i] for i in off.plan.seg_episode)


def test_repeat_and_swap(toy):
    ds = make(toy, num_repeat_traj=3, shuffle_repeat_traj=False, rebalance_tasks=False)
    seq = [ds.episodes[i] for i in ds.plan.seg_episode]
    runs = [1]
    for x, y in zip(seq, seq[1:]): runs[-1:] = [runs[-1] + 1] if x == y else [runs[-1], 1]
    assert max(runs) <= 3 and max(runs) > 1 and len(set(seq)) == len(ds.episodes)
    sw = make(toy, num_repeat_traj=3, shuffle_repeat_traj=True, rebalance_tasks=False)
    assert sorted(sw.episodes[i] for i in sw.plan.seg_episode) != [] and len(sw.plan.seg_episode) >= len(sw.episodes)


def test_layouts_flat_and_plain_identical(tmp_path):
    f, p = toy_dataset(tmp_path/"flat", layout="flat"), toy_dataset(tmp_path/"plain", layout="plain")
    a, b = make(f), make(p)
    for i in (0, 9):
        for k in ("observation", "proprio", "action", "prompt_mask", "weight_mask"): torch.testing.assert_close(a[i][k], b[i][k])


def test_quaternion_proprio_matches_euler(tmp_path):
    e, q = toy_dataset(tmp_path/"e"), toy_dataset(tmp_path/"q", quat=True)
    a, b = make(e, proprio_noise=0.0), make(q, proprio_noise=0.0)
    torch.testing.assert_close(a[4]["proprio"], b[4]["proprio"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[4]["action"], b[4]["action"], atol=1e-5, rtol=0)
    assert make(q)[4]["proprio"].shape == (40, 4, 10)                                # noisy quaternions too


def test_goal_conditioned(toy):
    ds = make(toy, goal_conditioned=True, seq_length=70, proprio_noise=0.0, num_weighted_steps=10)
    assert len(ds) == len(ds.plan.seg_episode)
    s = ds[1]; st = steps_of(s)
    e = st[0, 0, 0]; L = ds.spec.epi_len[f"episode_{e}"]
    assert st[0, 0, 1] == L - 1 and st[1, 0, 1] == 0 and (st[:, 0, 0] == e).all()   # goal first, then from the start
    n = min(L, 69)
    np.testing.assert_array_equal(s["prompt_mask"].numpy(), np.r_[0, np.ones(n), np.zeros(69 - n)])
    np.testing.assert_array_equal(s["weight_mask"].numpy(), np.r_[0, np.ones(10), np.zeros(59)])
    assert s["observation"].shape[0] == 70


def test_val_split_min_one_and_save_split(tmp_path):
    cfg = toy_dataset(tmp_path, train_split=0.7)
    tr, va = make(cfg), make(cfg, split="val")
    assert set(tr.episodes).isdisjoint(va.episodes)
    assert va.counts is None and all(len(v) >= 1 for v in va.groups.values())
    tp, vp = tr.save_split(tmp_path/"run")
    assert json.loads(tp.read_text()) == tr.split_episodes["train"] and json.loads(vp.read_text()) == tr.split_episodes["val"]
    assert make(cfg, split_file=tp).episodes == tr.episodes
    assert make(cfg, split="val", split_file=vp).episodes == va.episodes


def test_workers_match_direct_reads(toy):
    ds = make(toy)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, sampler=DistributedSubEpochSampler(ds, 1, 0, seed=3))
    it = iter(dl); b = next(it); b2 = next(it)
    idx = DistributedSubEpochSampler(ds, 1, 0, seed=3).indices()[:4]
    torch.testing.assert_close(torch.cat([b["observation"], b2["observation"]]), torch.stack([ds[i]["observation"] for i in idx]))


def test_gpu_preprocess_matches_cpu_path(toy):
    cpu, gpu = make(toy), make(toy, gpu_preprocess=True)
    batch = torch.utils.data.default_collate([gpu[i] for i in (2, 8, 13)])
    assert batch["observation"].dtype == torch.uint8 and batch["observation"].shape == (3, 40, 2, 24, 32, 3)
    devs = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devs:
        out = preprocess_batch(batch, DC, dev)
        ref = torch.stack([cpu[i]["observation"] for i in (2, 8, 13)])
        if dev == "cpu": torch.testing.assert_close(out["observation"], ref, atol=1e-5, rtol=0)
        else: assert (out["observation"].cpu() - ref).abs().mean() < 0.01   # float vs uint8 resampling route
        torch.testing.assert_close(out["action"].cpu(), batch["action"])


def test_custom_vision_transform(toy):
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(20), T.CenterCrop(16)])
    ds = SequenceDataset(DatasetConfig(dataset_json=str(toy)), SharedConfig(seq_length=40, num_pred_steps=4),
                         vision_transform=tf, data_config=DC)
    assert ds[0]["observation"].shape == (40, 2, 3, 16, 16)
    with pytest.raises(ConfigError, match="gpu-preprocess"):
        SequenceDataset(DatasetConfig(dataset_json=str(toy), gpu_preprocess=True), SharedConfig(), vision_transform=tf)


def test_action_statistics_and_load_episode(toy):
    ds = make(toy)
    st = ds.lowdim_statistics()["action"]
    assert st["count"] == sum(int(ds.lengths[i]) for i in range(len(ds.episodes))) * 4
    assert len(st["mean"]) == 10 and all(lo <= m <= hi for lo, m, hi in zip(st["min"], st["mean"], st["max"]))
    ep = load_episode(toy, "episode_3")
    L = ds.spec.epi_len["episode_3"]
    assert ep["proprio"].shape == (L, 10) and ep["actions"].shape == (L, 10) and ep["task"] == "reach"
    np.testing.assert_allclose(ep["actions"][:-1, :9], ep["proprio"][1:, :9], atol=1e-6)
    np.testing.assert_array_equal(ep["frames"]["observation/exterior_image_1_left"][:, 0, 0, 0], np.arange(L))
    with pytest.raises(DatasetError, match="unknown episode"): load_episode(toy, "nope")


def test_sampler_split_determinism_and_resume():
    class N:
        def __len__(self): return 101
    for se in (1, 3):
        per_epoch = []
        for e in range(se):
            parts = []
            for r in range(2):
                s = DistributedSubEpochSampler(N(), 2, r, split_epoch=se, seed=1); s.set_epoch(e); parts.append(list(s))
            assert set(parts[0]).isdisjoint(parts[1]) and len(parts[0]) == len(parts[1]) == 101 // (2 * se)
            per_epoch += parts[0] + parts[1]
        assert len(set(per_epoch)) == len(per_epoch)                                 # sub-epochs never repeat a window
    a, b = DistributedSubEpochSampler(N(), 1, 0, seed=1), DistributedSubEpochSampler(N(), 1, 0, seed=1)
    a.set_epoch(4); b.set_epoch(4); assert list(a) == list(b)
    b.set_epoch(5); assert list(a) != list(b)
    r = DistributedSubEpochSampler(N(), 1, 0, seed=1); r.load_state_dict(a.state_dict(consumed=30))
    assert len(r) == 71 and list(r) == a.indices()[30:]
    r.set_epoch(4); assert list(r) == a.indices()                                    # offset used once


def test_bad_inputs(tmp_path, toy):
    with pytest.raises(ConfigError, match="longer than every task"): make(toy, seq_length=1000)
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['fly'\]"): make(toy, task_names=["fly"])
    few = toy_dataset(tmp_path/"few", tasks={"a": 3, "b": 2})
    with pytest.raises(DatasetError, match="no task has at least 4 train episodes"): make(few)
    ghost = toy_dataset(tmp_path/"ghost", ghost=True)
    with pytest.raises(DatasetError, match="'episode_ghost'.*missing from the file"): make(ghost)
    bad = tmp_path/"split.json"; bad.write_text(json.dumps(["episode_0", "episode_999"]))
    with pytest.raises(DatasetError, match="unknown to"): make(toy, split_file=bad)
    short = toy_dataset(tmp_path/"short", lengths=[20] * 17)
    with pytest.raises(DatasetError, match="no task has at least 4"): make(short)   # all below the 30-step minimum



def _with_min_demos(cfg, n):
    "A copy of dataset config `cfg`, beside it, with a top-level `min_demos` entry."
    p = Path(cfg).parent / f"min_demos_{n}.json"
    p.write_text(json.dumps({**json.loads(Path(cfg).read_text()), "min_demos": n})); return p


def test_min_demos_keeps_few_demo_tasks_and_fills_their_blocks(tmp_path):
    "Tasks of 2 and 1 episodes: dropped by default; with min_demos 1 kept, each block drawn until a window fits."
    cfg = toy_dataset(tmp_path, tasks={"a": 2, "b": 1, "c": 5}, lengths=[30, 30, 35, 50, 50, 50, 50, 50])
    pub = make(cfg, seq_length=90)
    assert sorted(pub.groups) == ["c"] and pub.fill == {}                         # the published rule: fewer than 4 dropped
    ds = make(_with_min_demos(cfg, 1), seq_length=90)
    assert sorted(ds.groups) == ["a", "b", "c"] and ds.fill == {"a": 90, "b": 90}  # c has 5: drawn as published
    for epoch in range(4):
        ds.shuffle_dataset(epoch)
        for g, task in enumerate(ds.plan.block_task):
            a, n = ds.plan.block_start[g], ds.plan.block_len[g]
            assert n >= 90 and ((ds.plan.starts >= a) & (ds.plan.starts <= a + n - 90)).any(), (epoch, task)
            segs = [ds.episodes[ds.plan.seg_episode[i]] for i in np.flatnonzero((ds.plan.seg_start >= a) & (ds.plan.seg_start < a + n))]
            if task == "a": assert all(x != y for x, y in zip(segs, segs[1:])), segs   # the other demo, never itself
            if task == "b": assert segs == ["episode_2"] * 3                               # one demo: repeated
    s = ds[0]
    assert s["proprio"].shape == (90, 4, 10) and 0 < s["prompt_mask"].sum() < 90


def test_min_demos_bad_value(tmp_path, toy):
    p = Path(toy).parent / "bad_min_demos.json"  # beside the toy config: its relative paths resolve
    for v in (0, "2", True, 1.5):
        p.write_text(json.dumps({**json.loads(Path(toy).read_text()), "min_demos": v}))
        with pytest.raises(DatasetError, match="key 'min_demos'") as e: make(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)

def _file_bytes(folder):
    "Every file under `folder` with its content (to prove a refused input changed nothing)."
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("delta", [-1, 1])
def test_epi_len_one_step_off_is_refused_up_front(tmp_path, delta):
    "An epi_len_mapping entry one step shorter or longer than the file: one line when the dataset is built; icrt_check too."
    cfg = toy_dataset(tmp_path/"toy", lengths=[40] * 17)
    mapping = tmp_path/"toy"/"epi_len_mapping.json"
    lens = json.loads(mapping.read_text()); lens["episode_5"] += delta; mapping.write_text(json.dumps(lens))
    before = _file_bytes(tmp_path/"toy")
    with pytest.raises(DatasetError) as e: make(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "part1.hdf5: episode 'episode_5'" in msg and "has 40 steps but epi_len_mapping" in msg
    assert f"says {40 + delta}" in msg and "run icrt_check" in msg
    r = subprocess.run([sys.executable, "-c", "from icrt.data.format import check_cli; check_cli()", str(cfg)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "episode 'episode_5'" in r.stderr and f"epi_len_mapping says {40 + delta}" in r.stderr
    assert _file_bytes(tmp_path/"toy") == before


def _published_split(cfg_dir, seed, task_names=None):
    "The published ICRT split, written out: length filter, task filter, sort, RandomState(seed).shuffle, cut."
    cfg = json.loads((cfg_dir/"dataset_config.json").read_text())
    names = [k for f in cfg["hdf5_keys"] for k in json.loads((cfg_dir/f).read_text())]
    length = json.loads((cfg_dir/cfg["epi_len_mapping_json"]).read_text())
    names = [k for k in names if 30 <= length[k] <= 450]
    if task_names:
        v2e = json.loads((cfg_dir/cfg["verb_to_episode"]).read_text())
        names = list(set(names) & {e for t in task_names for e in v2e[t]})
    names = sorted(names)
    np.random.RandomState(seed=seed).shuffle(names)
    n = int(len(names) * cfg["train_split"])
    return names[:n], names[n:]


@pytest.mark.parametrize("seed,tasks", [(0, None), (1, None), (0, ["2024-05-31-open-drawer", "2024-07-08-square-peg"])])
def test_split_is_the_published_one_on_icrt_mt(tmp_path, monkeypatch, seed, tasks):
    "On the bundled ICRT-MT metadata a run trains and holds out exactly the episodes the published code does."
    from icrt.config import REPO_CONFIGS
    (tmp_path/"icrt_mt.hdf5").touch(); monkeypatch.setenv("ICRT_MT_HDF5", str(tmp_path/"icrt_mt.hdf5"))  # never opened
    cfg_dir = REPO_CONFIGS/"data_config"
    ds = SequenceDataset(DatasetConfig(dataset_json=str(cfg_dir/"dataset_config.json"), task_names=tasks),
                         SharedConfig(seq_length=40, seed=seed), data_config=DC, verify=False)
    train, val = _published_split(cfg_dir, seed, tasks)
    assert ds.split_episodes == {"train": train, "val": val}
    assert len(train) + len(val) == (1550 if tasks is None else 143) and val


def test_bench_cli_runs(toy):
    r = subprocess.run([sys.executable, "-m", "icrt.bench.loader", str(toy), "--seq-length", "8", "--num-workers", "0",
                        "--samples", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "samples/s" in r.stdout and "naive" in r.stdout and "speed-up" in r.stdout
    r = subprocess.run([sys.executable, "-m", "icrt.bench.loader", "/nonexistent.json"], capture_output=True, text=True)
    assert r.returncode != 0 and "not found" in r.stderr
