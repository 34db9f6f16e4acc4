"""`scripts/train.py` under faults, with real processes: killed at random moments (also during a save) and
resumed, a stopped rank, ranks extracting one archive at once, bad command-line values, a reused run folder."""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from test_train_script import ROOT, SCRIPT, assert_same, checkpoint_state, ranks

from dst_prune.training import datasets
from dst_prune.training.run_log import RunLog

sys.path.insert(0, str(ROOT / "scripts"))
from train_args import build_parser, parse_args

FAULT_RUN = ["--cpu", "--max-steps", "150", "--batch-size", "16", "--update-every", "4", "--grad-accum", "2",
             "--method", "rigl", "--checkpoint-every", "4", "--keep-checkpoints", "3", "--log-every", "5",
             "--ema", "0.9"]


@pytest.fixture(autouse=True, scope="module")
def _temporary_files_under_pytest(tmp_path_factory):
    """The processes these tests start keep their temporary files (torchrun's logs) in pytest's folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        yield


def command(output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *FAULT_RUN, "--output-dir", str(output), *extra]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _modified_after(path: Path, moment: float) -> bool:
    try:
        return path.stat().st_mtime > moment
    except FileNotFoundError:  # renamed into place meanwhile
        return False


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_ends_bitwise_equal(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, capture_output=True, env=environment(), timeout=300)
    faulty, rng = tmp_path / "faulty", random.Random(0)
    latest = faulty / "checkpoints" / "latest"
    kills, during_save, finished = 0, 0, False
    while not finished:
        start, launched = (latest.read_text() if latest.is_file() else None), time.time()
        process = subprocess.Popen(command(faulty, *(["--resume", "latest"] if start else [])),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment())
        in_save = kills % 2 == 1 and kills < 6  # every other kill lands while a checkpoint is being written
        delay, progressed_at = rng.uniform(0.0, 0.15), None
        while process.poll() is None:  # kill once the run has made progress: a new checkpoint, or one under way
            saving = any(_modified_after(p, launched) for p in (faulty / "checkpoints").glob(".partial-*"))
            if in_save and saving and progressed_at is None and latest.is_file():
                break
            if progressed_at is None and latest.is_file() and latest.read_text() != start:
                progressed_at = time.monotonic()
            if kills < 6 and not in_save and progressed_at is not None and time.monotonic() > progressed_at + delay:
                break
            time.sleep(0.001)
        if process.poll() is None:
            during_save += any((faulty / "checkpoints").glob(".partial-*"))
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        else:
            assert process.returncode == 0, process.stderr.read().decode()[-3000:]
            finished = True
        assert kills <= 6, "the run never finished"
    assert kills >= 4 and during_save >= 1
    final = sorted(p for p in (straight / "checkpoints").iterdir() if p.is_dir())[-1].name
    assert_same(checkpoint_state(straight / "checkpoints" / final), checkpoint_state(faulty / "checkpoints" / final))
    assert ranks(straight) == ranks(faulty)
    # the log has every row once, equal to the uninterrupted run's
    assert (straight / "train.csv").read_text() == (faulty / "train.csv").read_text()


@pytest.mark.slow
def test_a_stopped_rank_fails_the_run_with_a_clear_message(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--cpu",
              "--epochs", "200", "--log-every", "1", "--dist-timeout", "8", "--output-dir", str(tmp_path)]
    process = subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment())
    try:
        while not (tmp_path / "train.csv").is_file():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(process.pid).children(recursive=True)
        workers = [p for p in children if "train.py" in " ".join(p.cmdline())]
        stopped = max(workers, key=lambda p: p.pid)
        stopped.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 0 and time.monotonic() - started < 90
        assert "did not answer within --dist-timeout=8 s" in stderr.decode()
    finally:
        for child in psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []:
            child.kill()
        process.kill()


def test_a_fresh_run_in_a_used_folder_is_refused(tmp_path):
    import train

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-0000003")
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run: pass --resume latest"):
        train.main(["--cpu", "--max-steps", "3", "--output-dir", str(tmp_path)])


@pytest.mark.parametrize(("argv", "message"), [
    (["--grad-accum", "0"], "argument --grad-accum: '0' is not a positive integer"),
    (["--max-steps", "0"], "argument --max-steps: '0' is not a positive integer"),
    (["--hp", "drop_fraction"], "argument --hp: 'drop_fraction' is not KEY=VALUE"),
    (["--sparsity", "1.0"], "argument --sparsity: '1.0' is not a number in [0, 1)"),
    (["--lr", "nan"], "argument --lr: 'nan' is not a positive number"),
    (["--dist-timeout", "-1"], "argument --dist-timeout: '-1' is not a positive number"),
    (["--dist-timeout", "1e308"], "argument --dist-timeout: '1e308' is not a positive number of seconds (at most"),
    (["--seed", "4294967296"], "argument --seed: '4294967296' is not a seed in [0, 4294967295]"),
    (["--stop-epoch", "1e308"], "argument --stop-epoch: '1e308' is not a positive number of epochs (at most 1e+06)"),
    (["--epochs", "1e308"], "argument --epochs: '1e308' is not a positive number of epochs"),
    (["--milestones", "10", "1e308"], "argument --milestones: '1e308' is not a positive number of epochs"),
    (["--resume", "latest", "--overwrite"], "--resume continues the run in --output-dir and --overwrite starts it"),
])
def test_bad_command_line_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_output_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    for output in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--output-dir", str(output)])
        assert exit_.value.code == 2 and f"{tmp_path / 'notes.txt'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert "(default: None)" not in text and text.count("default") == len(options)
    for shown in ("--lr LR learning rate (default: 0.1)", "--nesterov Nesterov momentum (default: off)",
                  "--output-dir OUTPUT_DIR where the outputs go (default: runs/<dataset>-<model>-<method>-<sparsity>)",
                  "--milestones [MILESTONES ...] epochs where a step schedule decays (default: none)"):
        assert shown in text, shown


def _extract_in(cache: str, archive: str, queue) -> None:
    os.environ["DST_PRUNE_CACHE"] = cache
    try:
        queue.put(str(datasets._extract(Path(archive))))
    except Exception as error:
        queue.put(f"error: {error!r}")


def test_ranks_extracting_one_archive_at_once_and_after_a_crash(tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "test"):
            for i in range(300):
                zf.writestr(f"images/{split}/class{i % 3}/{i}.txt", "x" * 2000)
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_extract_in, args=(str(cache), str(archive), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join()
    assert len(set(results)) == 1 and not results[0].startswith("error"), results
    folder = Path(results[0])
    assert len(list((folder / "train").rglob("*.txt"))) == 300 and not list(cache.glob("*.partial-*"))
    # a crash between extraction and its marker (an older version's layout): the next call repairs it
    (folder.parent / ".complete").unlink()
    (folder / "train" / "class0" / "0.txt").unlink()
    os.environ["DST_PRUNE_CACHE"] = str(cache)
    try:
        (cache / f"{folder.parent.name}.partial-999-dead").mkdir()  # a crash in the middle of an extraction
        again = datasets._extract(archive)
    finally:
        del os.environ["DST_PRUNE_CACHE"]
    assert again == folder and len(list((again / "train").rglob("*.txt"))) == 300


def test_run_log_keeps_one_stable_header_and_resumes_without_lost_or_repeated_rows(tmp_path):
    log = RunLog(tmp_path)
    log.log("train", 20, {"loss": 1.0, "lr": 0.1})
    log.log("train", 40, {"loss": 0.9, "lr": 0.1, "threshold": 0.002, "churn": 0.1})  # new columns appear
    log.log("train", 60, {"loss": 0.8, "lr": 0.1})
    log.close()
    with (tmp_path / "train.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "lr", "threshold", "churn"] and all(len(r) == 5 for r in rows)
    resumed = RunLog(tmp_path, resume_step=40)  # the run stopped after its checkpoint at step 40
    resumed.log("train", 60, {"loss": 0.8, "lr": 0.1})
    resumed.close()
    with (tmp_path / "train.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [20, 40, 60]
    # a log written by an older version: a 5-column header over longer rows
    (tmp_path / "train.csv").write_text("step,loss,lr,sparsity,epoch\n20,1,0.1,0.9,0\n100,1,0.1,0.9,0,0.002,0.1,0.5\n")
    RunLog(tmp_path, resume_step=100).close()
    with (tmp_path / "train.csv").open() as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["20", "100"]


def test_a_row_cut_off_mid_write_is_dropped_on_resume(tmp_path, caplog):
    log = RunLog(tmp_path)
    log.log("train", 20, {"loss": 1.0, "lr": 0.1})
    log.log("train", 40, {"loss": 0.9, "lr": 0.1})
    log.close()
    with (tmp_path / "train.csv").open("a") as f:
        f.write("40,0.85,0.")  # the disk filled up while the row of step 40 (re-logged) was written
    resumed = RunLog(tmp_path, resume_step=40)
    resumed.log("train", 60, {"loss": 0.8, "lr": 0.1})
    resumed.close()
    text = (tmp_path / "train.csv").read_text()
    assert text == "step,loss,lr\n20,1.0,0.1\n40,0.9,0.1\n60,0.8,0.1\n"
    assert "dropped a partial last line" in caplog.text and "40,0.85,0." in caplog.text
