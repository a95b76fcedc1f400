"icrt_bench_train runs a few real training steps in both loader modes and prints its table."
import subprocess
import sys

from icrt.tiny import toy_dataset


def test_bench_train_cli(tmp_path):
    ds = toy_dataset(tmp_path / "toy")
    p = subprocess.run([sys.executable, "-m", "icrt.bench.train", "--config", "tiny", "--data", str(ds), "--steps", "3",
                        "--warmup", "1", "--num-workers", "0", "--device", "cpu", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| True |" in p.stdout and "| False |" in p.stdout and "samples/s" in p.stdout
    assert (tmp_path / "r.json").is_file()


def test_bench_train_rejects_bad_steps():
    p = subprocess.run([sys.executable, "-m", "icrt.bench.train", "--steps", "0"], capture_output=True, text=True)
    assert p.returncode == 2 and "--steps" in p.stderr


def test_bench_train_bad_dataset_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "icrt.bench.train", "--config", "tiny", "--data", str(tmp_path / "nope.json"),
                        "--steps", "1", "--num-workers", "0", "--device", "cpu"], capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert p.returncode == 1, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icrt_bench_train: error:") and "nope.json" in lines[0], p.stderr[-2000:]
