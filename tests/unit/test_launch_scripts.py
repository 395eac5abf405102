"""launch/*.sh: valid bash, --help without side effects, and the commands they would run."""
import importlib
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("launch/tpu_vm.sh", "launch/gpu.sh")
BASH = shutil.which("bash")
# The scripts run in bash subprocesses: slow by this suite's rule, though each takes little.
pytestmark = [pytest.mark.skipif(BASH is None, reason="needs bash"), pytest.mark.slow]


@pytest.fixture
def fake_tools(tmp_path):
    """PATH with `gcloud` / `python3` stand-ins that only record that they were called."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("gcloud", "python3", "nvidia-smi"):
        path = bindir / tool
        path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "XLA_", "CUDA_VISIBLE")) and k not in ("CONFIG", "WORKDIR", "PYTHON")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env, log


def run(script, *args, env):
    return subprocess.run([BASH, os.path.join(ROOT, script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run([BASH, "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_runs_nothing(script, fake_tools):
    env, log = fake_tools
    proc = run(script, "--help", env=env)
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"Usage: {script}")
    assert not log.exists(), log.read_text()


def test_tpu_unknown_command_is_an_error(fake_tools):
    env, log = fake_tools
    proc = run("launch/tpu_vm.sh", "start", env=env)
    assert proc.returncode == 2 and "unknown command 'start'" in proc.stderr
    assert "Usage:" in proc.stderr and not log.exists()


def test_tpu_dry_run_create_picks_the_runtime_for_the_type(fake_tools):
    env, log = fake_tools
    proc = run("launch/tpu_vm.sh", "create", "--dry-run", "--type", "v5litepod-8", "--spot", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "mta-jax", "--zone=us-central2-b",
        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert not log.exists()


def test_tpu_run_on_all_workers_and_delete(fake_tools):
    env, log = fake_tools
    env = {**env, "TPU_NAME": "exp1", "TPU_ZONE": "europe-west4-a"}
    proc = run("launch/tpu_vm.sh", "run", "--workdir", "gs://bucket/runs/exp1", "--",
               "--config.train.batch_size=32", env=env)
    assert proc.returncode == 0, proc.stderr
    call = log.read_text()
    assert call.startswith("gcloud compute tpus tpu-vm ssh exp1 --zone=europe-west4-a --worker=all --command=")
    main = ("MTA_JAX_DISTRIBUTED=1 ~/mta-venv/bin/python -m mta_jax.main --config=configs/demo.py "
            "--workdir=gs://bucket/runs/exp1 --config.train.batch_size=32")
    assert main in call
    assert f"tpu_vm.sh: on every worker of exp1: cd ~/mta-jax && {main}" in proc.stderr
    assert "local to each worker" not in proc.stderr  # the gs:// workdir is shared
    log.unlink()
    proc = run("launch/tpu_vm.sh", "delete", "--yes", env=env)
    assert proc.returncode == 0
    assert log.read_text().strip() == "gcloud compute tpus tpu-vm delete exp1 --zone=europe-west4-a --quiet"


def test_gpu_runs_main_with_data_parallel_mesh(fake_tools):
    env, log = fake_tools
    proc = run("launch/gpu.sh", "--config", "configs/demo.py", "--", "--config.seed=1", env=env)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[-1] == ("python3 -m mta_jax.main --config=configs/demo.py --workdir=runs/demo "
                         "--config.mesh.data=-1 --config.seed=1")
    proc = run("launch/gpu.sh", "--dry-run", env={**env, "XLA_FLAGS": "--mine=1"})
    assert "XLA_FLAGS=--mine=1 --xla_gpu_enable_latency_hiding_scheduler=true" in proc.stdout


def test_gpu_defaults_to_the_demo_and_prints_the_command_for_a_bucket_workdir(fake_tools):
    env, log = fake_tools
    proc = run("launch/gpu.sh", "--workdir", "gs://bucket/runs/g1", env=env)
    assert proc.returncode == 0, proc.stderr
    command = ("python3 -m mta_jax.main --config=configs/demo.py --workdir=gs://bucket/runs/g1 "
               "--config.mesh.data=-1")
    assert log.read_text().splitlines()[-1] == command
    assert f": {command}" in proc.stderr and proc.stderr.count("gpu.sh: on ") == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_default_config_runs_as_shipped(script):
    """The launchers' default config validates with no data files or weights to fetch."""
    import re
    from mta_jax import build
    with open(os.path.join(ROOT, script)) as f:
        default = re.search(r'CONFIG="\$\{CONFIG:-([^}]+)\}"', f.read()).group(1)
    module = importlib.import_module(default[:-len(".py")].replace("/", "."))
    config = module.get_config()
    assert not config.init_from and config.data.source == "synthetic"
    build.validate_config(config)


def test_ci_runs_the_readme_test_command():
    """.ci/run's last line is the README's test command after its venv set-up, verbatim."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_command = f.read().strip().splitlines()[-1]
    assert ci_command == "pip install -q -e '.[test]' && python -m pytest -n 2 --dist loadfile"
    assert f". .venv/bin/activate && {ci_command}\n" in readme
