"""End-to-end multi-process runs of ``neuromask-pl``: DDP, two simulated nodes, SIGKILL and resume, the lock.

Every run here is a real subprocess on the CPU (gloo backend), driven through the console script or
``torchrun``, on small generated image folders. Masks are compared with a single-process run of the
same configuration (masks are seeded by sample id, so batching and sharding must not change them);
the stored masks are float16, hence the 1e-3 tolerance.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import write_cli_config
from PIL import Image

from neuromask_pl.store import load_results, scan_shards

# Every test here starts real processes (DDP, torchrun, a killed job): 20-40 s each, its module fixture included,
# on a 2-core machine.
pytestmark = pytest.mark.slow

TIMEOUT = 300  # seconds for one run (each takes ~5-20 s alone on a 2-core machine)
TOL = 1e-3  # masks are stored as float16
CORRUPT_ID = 3  # in the 7-file folder, sorted by name


# -- helpers ---------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    """The venv's console script ``name`` (next to the running interpreter), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
)


def _env(master_port: int | None = None) -> dict[str, str]:
    """The environment of a run: one intra-op thread, no inherited distributed settings."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if master_port is not None:  # Lightning's own launcher reads these (no port race between tests)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    return env


class Job:
    """A command run in its own session (so the whole process group can be killed), output in files."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.args, self.log = args, log
        self._out = open(log.with_suffix(".out"), "w")
        self._err = open(log.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=self._err, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the job and every process it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args[:3]} did not finish in {timeout} s\n{self.output()}")
        finally:
            self._out.close()
            self._err.close()

    def output(self) -> str:
        for f in (self._out, self._err):
            with contextlib.suppress(ValueError):
                f.flush()
        out = self.log.with_suffix(".out").read_text()
        err = self.log.with_suffix(".err").read_text()
        return f"--- stdout (end) ---\n{out[-3000:]}\n--- stderr (end) ---\n{err[-6000:]}"

    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text()


@contextlib.contextmanager
def _jobs() -> Iterator[list[Job]]:
    """Collects started jobs; any still running when the block exits (a failed test) is killed."""
    started: list[Job] = []
    try:
        yield started
    finally:
        for job in started:
            if job.running():
                job.kill()


def _start(jobs: list[Job], args: list[str], log: Path, master_port: int | None = None) -> Job:
    job = Job(args, log, _env(master_port))
    jobs.append(job)
    return job


def _run(args: list[str], log: Path, master_port: int | None = None) -> Job:
    """Run a command to the end; fails the test (with the command's output) unless it exits 0."""
    with _jobs() as jobs:
        job = _start(jobs, args, log, master_port)
        rc = job.wait()
    assert rc == 0, f"{' '.join(args)} exited {rc}\n{job.output()}"
    return job


def _cli_args(stage: str, config: Path, out: Path, log_root: Path, *extra: str) -> list[str]:
    args = [stage, "--config", str(config), "--writer.output_dir", str(out)]
    args += ["--trainer.default_root_dir", str(log_root)]
    if stage == "predict":
        args += ["--return_predictions", "false"]
    return [*args, *extra]


def _neuromask(stage: str, config: Path, out: Path, log_root: Path, *extra: str) -> list[str]:
    return [_tool("neuromask-pl"), *_cli_args(stage, config, out, log_root, *extra)]


def _make_folder(root: Path, n: int, corrupt: int | None = None, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if i == corrupt:
            (root / f"img{i:02d}.jpg").write_bytes(b"this is not a jpeg")
            continue
        size = (int(rng.integers(32, 56)), int(rng.integers(32, 56)))
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def _config(path: Path, images: Path, steps: int, preset: str = "default") -> Path:
    return write_cli_config(path, images, steps=steps, batch_size=2, preset=preset, writer={"chunk_size": 2})


def _manifest_ids(out: Path) -> list[int]:
    with open(out / "manifest.csv", newline="") as f:
        return [int(row["sample_id"]) for row in csv.DictReader(f)]


def _masks(out: Path) -> dict[int, np.ndarray | None]:
    with load_results(out) as results:
        return {int(i): results.mask(int(i)) for i in results.ids}


def _shard_ids(out: Path) -> dict[str, list[int]]:
    """Sample ids of every complete, verified shard (by shard name); fails on a bad shard."""
    scan = scan_shards(out, verify=True)
    assert scan.bad == [] and scan.temp_files == [], (scan.bad, scan.temp_files)
    return {s.name: s.ids.tolist() for s in scan.good}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_masks(out: Path, reference: dict[int, np.ndarray | None], exact: bool = False) -> None:
    """The masks in ``out`` are ``reference``'s: to TOL, or with ``exact`` bit for bit."""
    masks = _masks(out)
    assert masks.keys() == reference.keys()
    for sample_id, ref in reference.items():
        got = masks[sample_id]
        if ref is None:
            assert got is None, f"sample {sample_id} has a mask here but none in the reference"
            continue
        assert got is not None and got.shape == ref.shape, sample_id
        assert np.abs(got - ref).max() <= (0 if exact else TOL), f"sample {sample_id}: {np.abs(got - ref).max()}"


def _assert_complete(out: Path, n: int, explained: int, skipped: int) -> dict:
    """One manifest row and one indexed result per id 0..n-1, counts in run.json, no lock left."""
    ids = _manifest_ids(out)
    assert ids == list(range(n)), ids  # sorted, each id exactly once
    with load_results(out) as results:
        assert results.indexed  # index.npz matches the shards on disk
        assert results.ids.tolist() == list(range(n))
    record = json.loads((out / "run.json").read_text())
    assert record["counts"] == {"explained": explained, "skipped": skipped}
    assert not (out / ".lock").exists()
    assert not list(out.glob(".lock.stale*"))
    return record


def _ranks(names: list[str]) -> set[int]:
    return {int(name[1:6]) for name in names}


# -- shared data and single-process references -----------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """7 files (not a multiple of the world size), file 3 unreadable; 5 steps; its single-process result.

    The `paper` preset: a DDP rank runs a sample in another batch (here: alone, beside the unreadable file) and
    thread count, so its classifier's gradients differ by float32 rounding (about 1e-7 relative). Under `paper`
    that stays far below the masks' float16 storage step (TOL) in 5 steps: RMSProp with its mean square starting at
    1 moves a weight by ``lr * g / sqrt(ms)``, smooth in ``g``, and ``sigmoid(w / 0.3)`` has a slope of at most 0.83.
    The `default` preset's first steps normalise each gradient to ``lr`` (Adam) at a temperature falling to 0.01
    within the 5 steps, which can amplify it to a few thousandths on a soft pixel of an untrained model (README,
    Reproducibility), so it is not a test of the sharding. The `large` job runs the `default` preset.
    """
    root = tmp_path_factory.mktemp("small")
    images = _make_folder(root / "images", 7, corrupt=CORRUPT_ID)
    config = _config(root / "small.yaml", images, steps=5, preset="paper")
    out = root / "reference"
    _run(_neuromask("predict", config, out, root / "logs"), root / "reference")
    _assert_complete(out, 7, explained=6, skipped=1)
    masks = _masks(out)
    assert masks[CORRUPT_ID] is None and sum(m is not None for m in masks.values()) == 6
    return {"root": root, "config": config, "masks": masks}


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 readable images, 40 steps (about 1 s per batch of 2, 12 shards of 2); its single-process result."""
    root = tmp_path_factory.mktemp("large")
    images = _make_folder(root / "images", 24, seed=1)
    config = _config(root / "large.yaml", images, steps=40)
    out = root / "reference"
    _run(_neuromask("predict", config, out, root / "logs"), root / "reference")
    _assert_complete(out, 24, explained=24, skipped=0)
    return {"root": root, "config": config, "masks": _masks(out)}


# -- 1. DDP with Lightning's launcher ----------------------------------------------------------------
def test_ddp_predict_writes_each_sample_once_with_single_process_masks(small: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _neuromask("predict", small["config"], out, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    job = _run(args, tmp_path / "ddp_predict", master_port=_free_port())

    record = _assert_complete(out, 7, explained=6, skipped=1)
    assert record["trainer"]["world_size"] == 2 and record["trainer"]["strategy"] == "DDPStrategy"
    shards = _shard_ids(out)
    assert _ranks(list(shards)) == {0, 1}, sorted(shards)  # both ranks wrote
    assert len({name.split("-")[2] for name in shards}) == 1  # one session token for the whole job
    written = [i for ids in shards.values() for i in ids]
    # predict splits the samples without padding: every id written exactly once, over both ranks
    assert sorted(written) == list(range(7)), sorted(written)
    with load_results(out) as results:
        row = results.row(CORRUPT_ID)
    assert row["status"] == "skipped" and row["path"].endswith(f"img{CORRUPT_ID:02d}.jpg") and row["error"]
    _assert_same_masks(out, small["masks"])
    assert job.log.with_suffix(".out").read_text().count("explanations written to") == 1  # rank 0 reports

    # The same DDP command again: only the unreadable sample is left (fewer samples than ranks).
    digests = {name: _sha256(out / "shards" / name) for name in shards}
    _run(args, tmp_path / "ddp_rerun", master_port=_free_port())
    _assert_complete(out, 7, explained=6, skipped=1)
    again = _shard_ids(out)
    assert {name: _sha256(out / "shards" / name) for name in shards} == digests  # earlier shards untouched
    redone = [i for name, ids in again.items() if name not in shards for i in ids]
    assert CORRUPT_ID in redone and len(redone) <= 2, redone  # retried; at most one sample per rank redone
    _assert_same_masks(out, small["masks"])


def test_ddp_test_stage_explains_each_sample_once(small: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _neuromask("test", small["config"], out, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    _run(args, tmp_path / "ddp_test", master_port=_free_port())

    _assert_complete(out, 7, explained=6, skipped=1)
    shards = _shard_ids(out)
    assert _ranks(list(shards)) == {0, 1}, sorted(shards)
    written = sorted(i for ids in shards.values() for i in ids)
    # the package's DataModules shard without the DistributedSampler's padding: each sample is explained once
    assert sorted(written) == list(range(7)), written
    _assert_same_masks(out, small["masks"])


# -- 2. SIGKILL mid-run, then the same command resumes ------------------------------------------------
def test_sigkill_then_rerun_resumes_only_missing_samples(large: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _neuromask("predict", large["config"], out, tmp_path)
    shards_dir = out / "shards"
    with _jobs() as jobs:
        job = _start(jobs, args, tmp_path / "killed")
        deadline = time.monotonic() + TIMEOUT
        while len(list(shards_dir.glob("*.npz.sha256"))) < 3:
            assert job.running(), f"the job ended before it could be killed\n{job.output()}"
            assert time.monotonic() < deadline, f"no shards after {TIMEOUT} s\n{job.output()}"
            time.sleep(0.02)
        job.kill()
    assert job.proc.returncode == -signal.SIGKILL

    # What the killed job left: complete shards (their sidecars match), maybe a partial file, and its lock.
    before = {p.name[: -len(".sha256")] for p in shards_dir.glob("*.npz.sha256")}
    assert 3 <= len(before) < 12, sorted(before)  # killed mid-run
    digests = {name: _sha256(shards_dir / name) for name in before}
    for name, digest in digests.items():
        assert (shards_dir / f"{name}.sha256").read_text() == f"{digest}  {name}\n"
    done_before = {i for s in scan_shards(out, verify=True).good for i in s.ids.tolist()}
    holder = json.loads((out / ".lock").read_text())
    assert holder["pid"] == job.pid and holder["host"] == socket.gethostname()
    with pytest.raises(ProcessLookupError):
        os.kill(job.pid, 0)  # the holder is dead
    assert not (out / "manifest.csv").exists() and not (out / "index.npz").exists()

    # The rerun batches the remaining samples by 3, not by 2: none of its batches is one of the killed job's.
    rerun = _run(_neuromask("predict", large["config"], out, tmp_path, "--data.init_args.batch_size", "3"),
                 tmp_path / "rerun")  # fmt: skip
    assert "took over the stale lock" in rerun.stderr(), rerun.output()
    _assert_complete(out, 24, explained=24, skipped=0)
    shards = _shard_ids(out)  # verified: no corrupt, incomplete or temporary file remains
    assert before <= shards.keys()
    assert {name: _sha256(shards_dir / name) for name in before} == digests  # untouched
    new = [i for name, ids in shards.items() if name not in before for i in ids]
    # the rerun explained exactly the samples that were not in a complete shard, each once
    assert sorted(new) == sorted(set(range(24)) - done_before), (sorted(new), sorted(done_before))
    assert len({name.split("-")[2] for name in shards if name not in before}) == 1  # one new session
    # the `default` preset on the CPU: each sample's mask is the same bit for bit in the rerun's batches of 3 as in
    # the uninterrupted run's batches of 2 (tests/fastcopy/test_invariant.py)
    _assert_same_masks(out, large["masks"], exact=True)

    # A third run finds everything done: nothing is written, nothing changes.
    names = sorted(p.name for p in shards_dir.iterdir())
    _run(args, tmp_path / "third")
    assert sorted(p.name for p in shards_dir.iterdir()) == names
    _assert_complete(out, 24, explained=24, skipped=0)


# -- 3. two nodes (torchrun, one process each) on one machine ------------------------------------------
def test_two_torchrun_nodes_write_each_sample_once(small: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    port = _free_port()
    cli = _cli_args("predict", small["config"], out, tmp_path)
    cli += ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp"]
    with _jobs() as jobs:
        nodes = []
        for node_rank in (0, 1):
            args = [_tool("torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node_rank)]
            args += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "neuromask_pl.cli", *cli]
            nodes.append(_start(jobs, args, tmp_path / f"node{node_rank}"))
        codes = [node.wait(timeout=150) for node in nodes]  # a crashed peer can stall torchrun's exit barrier
    assert codes == [0, 0], "\n".join(node.output() for node in nodes)

    record = _assert_complete(out, 7, explained=6, skipped=1)
    assert record["trainer"]["num_nodes"] == 2 and record["trainer"]["world_size"] == 2
    shards = _shard_ids(out)
    assert _ranks(list(shards)) == {0, 1}, sorted(shards)
    assert sorted(i for ids in shards.values() for i in ids) == list(range(7))
    _assert_same_masks(out, small["masks"])


# -- 4. a second job on the same output directory is refused -------------------------------------------
def test_second_job_on_same_output_dir_is_refused(large: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with _jobs() as jobs:
        # Three times the steps of the reference run, so that the first job is surely still running
        # (holding the lock) when the second one starts, even on a loaded machine.
        slow = ("--model.steps", "120")
        first = _start(jobs, _neuromask("predict", large["config"], out, tmp_path / "a", *slow), tmp_path / "first")
        deadline = time.monotonic() + TIMEOUT
        while not (out / ".lock").exists():
            assert first.running(), f"the first job ended before taking the lock\n{first.output()}"
            assert time.monotonic() < deadline, f"no lock after {TIMEOUT} s\n{first.output()}"
            time.sleep(0.02)
        second = _start(jobs, _neuromask("predict", large["config"], out, tmp_path / "b", *slow), tmp_path / "second")
        rc = second.wait()
        first_alive = first.running()
        assert rc != 0, f"the second job was not refused\n{second.output()}"
        assert "another neuromask-pl job" in second.stderr(), second.output()
        assert f"pid {first.pid}" in second.stderr(), second.output()
        assert first_alive, "the first job finished before the second reached the lock: the test proves nothing"
        assert first.wait() == 0, first.output()

    _assert_complete(out, 24, explained=24, skipped=0)
    shards = _shard_ids(out)
    assert len({name.split("-")[2] for name in shards}) == 1  # only the first job wrote
    assert sorted(i for ids in shards.values() for i in ids) == list(range(24))
