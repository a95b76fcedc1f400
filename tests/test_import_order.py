"""Every import order of the package's modules works under MUJOCO_GL=osmesa.

With OSMesa, importing MuJoCo loads Mesa's libOSMesa and its libLLVM into the process's global symbol scope; triton's
libtriton (pulled in by torchvision.ops and torch.compile) carries its own LLVM, and its static initialisers then bind
to Mesa's copy and crash. `icrt.sim.metaworld` therefore loads triton before MuJoCo."""
import importlib.util, os, pkgutil, subprocess, sys

import pytest

import icrt

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mujoco") is None or importlib.util.find_spec("triton") is None,
                                reason="needs mujoco and triton (pip install -e '.[sim]')")
MODULES = sorted(m.name for m in pkgutil.walk_packages(icrt.__path__, "icrt.") if not m.name.endswith("_modidx"))
SIM_MODULES = ["icrt.sim.metaworld", "icrt.bench.metaworld"]  # the modules that import MuJoCo


def run(*modules:str, then:str="")->subprocess.CompletedProcess:
    "Import `modules` in this order in a fresh interpreter under OSMesa; print ok at the end."
    code = "".join(f"import {m}\n" for m in modules) + then + "print('ok')\n"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "MUJOCO_GL": "osmesa"}, capture_output=True,
                          text=True, timeout=600)


def check(r:subprocess.CompletedProcess, what:str):
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), f"{what}: exit {r.returncode} {r.stderr[-1500:]}"


@pytest.mark.parametrize("sim", SIM_MODULES)
def test_simulator_first_then_everything(sim):
    "The simulator first, then every other module of the package, then triton and a compiled function."
    check(run(sim, *[m for m in MODULES if m != sim], "triton",
              then="import torch\nassert torch.compile(lambda x: x + 1)(torch.zeros(2)).tolist() == [1.0, 1.0]\n"), sim)


def test_everything_then_simulator():
    check(run(*[m for m in MODULES if m not in SIM_MODULES], *SIM_MODULES), "package, then the simulators")


@pytest.mark.slow
@pytest.mark.parametrize("sim", SIM_MODULES)
def test_every_pair_both_orders(sim):
    "Each module with a simulator module, in both orders, each pair in its own fresh interpreter."
    for m in MODULES:
        if m == sim: continue
        check(run(sim, m), f"import {sim}; import {m}"); check(run(m, sim), f"import {m}; import {sim}")
