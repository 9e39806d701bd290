from pathlib import Path

from envfiles import read_environment_pins, read_lock

ROOT = Path(__file__).resolve().parents[2]


def test_environment_yml_matches_lock():
    lock = read_lock(ROOT / "requirements.lock")
    env = read_environment_pins(ROOT / "environment.yml")
    assert lock, "requirements.lock has no pins"
    missing = sorted(set(lock) - set(env))
    extra = sorted(set(env) - set(lock))
    differ = sorted(n for n in set(lock) & set(env) if lock[n] != env[n])
    assert not (missing or extra or differ), (
        f"environment.yml out of step with requirements.lock (run `make lock`): "
        f"missing={missing} extra={extra} differ={differ}"
    )


def test_lock_pins_the_core_stack():
    lock = read_lock(ROOT / "requirements.lock")
    for name in ("torch", "torchvision", "pycocotools", "sympy", "papermill", "matplotlib", "tqdm", "hypothesis", "ipywidgets"):  # ipywidgets: progress bars in make lab
        assert name in lock, f"{name} is not pinned in requirements.lock"
