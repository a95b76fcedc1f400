"""Bad inputs of the published-run importer (icrt.published): nothing in a file runs, every error is one line."""
import pickle
from pathlib import Path

import pytest
import torch

from icrt.published import PublishedError, read_published_checkpoint, read_published_yaml

FIX = Path(__file__).parent / "fixtures" / "published"


class _Evil:
    "Unpickling this calls os.system(cmd)."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self):
        import os
        return (os.system, (self.cmd,))


def _one_line(e): assert "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {m}']", "!!python/object/new:os.system ['touch {m}']",
                                 "!!python/name:os.system", "!!python/module:os", "!!python/object:subprocess.Popen {{args: 'touch {m}'}}"])
def test_yaml_dangerous_tag_refused_nothing_runs(tmp_path, tag):
    marker = tmp_path / "ran"
    text = (FIX / "pretrain" / "run.yaml").read_text().replace("train: true", "train: " + tag.format(m=marker))
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(PublishedError, match="refused YAML tag 'tag:yaml.org,2002:python/") as e: read_published_yaml(tmp_path / "run.yaml")
    _one_line(e)
    assert str(tmp_path / "run.yaml") in str(e.value)
    assert not marker.exists()


def test_yaml_not_published(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset_cfg: {dataset_json: x}\n")
    with pytest.raises(PublishedError, match="not a published run.yaml"): read_published_yaml(tmp_path / "run.yaml")


@pytest.mark.parametrize("form", ["torch", "pickle"])
def test_checkpoint_malicious_pickle_refused_nothing_runs(tmp_path, form):
    marker = tmp_path / "ran"
    ck = {"args": _Evil(f"touch {marker}"), "model": {"w": torch.zeros(2)}, "epoch": 1}
    path = tmp_path / "checkpoint-1.pth"
    if form == "torch": torch.save(ck, path)
    else: path.write_bytes(pickle.dumps(ck))
    with pytest.raises(PublishedError, match=r"refused pickled global '(posix|os)\.system'; nothing in it was run") as e:
        read_published_checkpoint(path)
    _one_line(e)
    assert not marker.exists()


def test_bare_pickle_tensor_refused(tmp_path):
    "A tensor pickled outside torch.save is rebuilt by torch.load(weights_only=False) inside torch: refused too."
    (tmp_path / "c.pth").write_bytes(pickle.dumps({"model": {"w": torch.zeros(2)}}))
    with pytest.raises(PublishedError, match="refused pickled global 'torch.storage._load_from_bytes'"):
        read_published_checkpoint(tmp_path / "c.pth")


def test_checkpoint_truncated(tmp_path):
    data = (FIX / "pretrain" / "checkpoint-3.pth").read_bytes()
    (tmp_path / "checkpoint-3.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PublishedError, match="truncated or not a torch file") as e: read_published_checkpoint(tmp_path / "checkpoint-3.pth")
    _one_line(e)


def test_checkpoint_not_published(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(PublishedError, match="not a published ICRT checkpoint"): read_published_checkpoint(tmp_path / "x.pth")
    with pytest.raises(PublishedError, match="no such file"): read_published_checkpoint(tmp_path / "missing.pth")
