"""The GPU validation suite: everything that needs an NVIDIA GPU, measured and checked in one short run.

Parts: `tests` (`pytest -m gpu`: 2:4 export, every method's invariants on CUDA), `step_time` (bf16 training step
at batch 256 against dense and torch prune, eager and torch.compile), `reallocation` (one topology update at 25M
and 100M sparse weights), `memory` (peak CUDA memory of a step against dense) and `inference` (2:4 semi-structured
against dense for vit_base's MLP blocks). Every command runs in its own subprocess, so a part that fails or
crashes does not stop the others; the suite records its error and exits 1 at the end. Repeat counts are chosen up
front to fit `--budget-s`; a command that would not fit is skipped and recorded as skipped. The output folder gets
one JSON per part, `suite.json` and `summary.md` (machine, exact commands, targets met / not met).

    python benchmarks/gpu_suite.py                          # on an NVIDIA GPU, about 7 minutes
    python benchmarks/gpu_suite.py --device cpu --quick     # the same parts CI-sized on the CPU (under a minute)
    python benchmarks/gpu_suite.py --plan-only              # the commands and their estimated seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpu_suite_report import PARTS, Job, machine_info, targets, write_reports
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Estimated seconds, to plan the budget before anything runs. They are guesses (no GPU figures existed when they
# were written); suite.json keeps each command's estimate beside its wall time, to correct them.
FULL = {"resnet50": 0.15, "vit_small_patch16_224": 0.06, "vit_base_patch16_224": 0.15}  # a bf16 step at batch 256
QUICK = {"test_resnet": 0.15, "test_vit": 0.15}  # a step at batch 2 on a 2-core CPU
STEP_S = FULL | QUICK
COMPILE_S = {"resnet50": 60.0, "vit_small_patch16_224": 40.0, "vit_base_patch16_224": 45.0, "test_vit": 4.0}
OURS = ["static", "dsr", "rigl"]
# Repeat counts: the plan takes the first of these that fits the most important commands into the budget (the
# commands come most important first); what does not fit is skipped, and runs after all when the commands before it
# took less than their estimates.
LEVELS = [{"rounds": 20, "updates": 5, "realloc": 5, "inference": 50},
          {"rounds": 10, "updates": 3, "realloc": 3, "inference": 30},
          {"rounds": 5, "updates": 2, "realloc": 3, "inference": 20}]
QUICK_LEVEL = {"rounds": 2, "updates": 1, "realloc": 1, "inference": 5}


def peers() -> list[str]:
    """The peer libraries that are installed, as step_time's variant names."""
    found = {"rigl-torch": "rigl_torch", "sparsimony-rigl": "sparsimony"}
    return [name for name, module in found.items() if importlib.util.find_spec(module) is not None]


def shape(args: argparse.Namespace, model: str) -> list[str]:
    """The batch and image arguments (and channels_last for the CNN, as it is trained on GPUs)."""
    size = ["--batch", "2", "--image-size", "32"] if args.quick else ["--batch", "256", "--image-size", "224"]
    channels_last = ["--channels-last"] if model == "resnet50" else []
    return [*size, "--autocast", "none" if args.quick else "bf16", *channels_last]


def step_job(models: list[str], compiled: bool, args: argparse.Namespace, level: dict, raw: Path) -> Job:
    """step_time.py for `models`: dense, ours and torch prune (and the installed peers when eager)."""
    if compiled:
        variants = ["dense", "dsr"] if args.quick else ["dense", *OURS]
    else:
        variants = ["dense", *OURS, "prune", *peers()]
    warmup, mode = 1 if args.quick else 3, "compiled" if compiled else "eager"
    output = raw / f"step_time_{mode}_{'_'.join(models)}.json"
    argv = [PYTHON, "benchmarks/step_time.py", "--device", args.device, "--models", *models, *shape(args, models[0]),
            "--variants", *variants, "--repeats", str(level["rounds"]), "--warmup", str(warmup),
            "--update-repeats", str(level["updates"]), "--threads", str(args.threads)]
    if compiled:  # on the CPU only dynamo's tracing ("eager" backend): inductor would not be cheap there
        argv += ["--compile", "--compile-backend", "eager" if args.quick else "inductor"]
    estimate = args.startup
    for model in models:  # build, warm-up, rounds, updates; compiling dense, then a sparse graph, the rest cached
        estimate += len(variants) * (3 + (warmup + level["rounds"]) * STEP_S[model])
        estimate += len(OURS) * level["updates"] * (2 * STEP_S[model] + 0.3)
        estimate += COMPILE_S[model] * (1.5 + 0.2 * (len(variants) - 2)) if compiled else 0
    return Job("step_time", f"{mode} {' '.join(models)}", [*argv, "--output", str(output)], estimate, output)


def memory_job(model: str, args: argparse.Namespace, raw: Path) -> Job:
    """memory.py for one model: one subprocess per variant."""
    variants = ["dense", "dsr"] if args.quick else ["dense", *OURS]
    output = raw / f"memory_{model}.json"
    argv = [PYTHON, "benchmarks/memory.py", "--device", args.device, "--models", model, *shape(args, model),
            "--variants", *variants, "--parallel", "2", "--output", str(output)]  # two steps fit in a GPU's memory
    return Job("memory", model, argv, args.startup + len(variants) / 2 * (args.startup + 1 + 3 * STEP_S[model]),
               output)


def plan(args: argparse.Namespace, level: dict) -> list[Job]:
    """The commands in the order they run (most important first), with estimated seconds."""
    raw, quick, cuda = args.output_dir / "raw", args.quick, args.device == "cuda"
    tests = [PYTHON, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
             "--continue-on-collection-errors", "--junitxml", str(raw / "tests.xml")]  # one broken module stops none
    env = {}
    if quick:
        # every method, and every mode once (bfloat16 weights convolve slowly on a CPU: left to the GPU run)
        tests += ["tests/test_gpu.py", "-k", "float32 or (dsr and not bfloat16) or semi_structured"]
        env = {"DST_PRUNE_GPU_TESTS_DEVICE": args.device}
    else:
        tests += ["tests"]
    jobs = [Job("tests", "pytest -m gpu", tests, 25.0 if quick else 40.0, raw / "tests.xml", env)]
    sizes, methods = (["1"], ["dsr", "rigl"]) if quick else (["25", "100"], ["static", "dsr", "set", "rigl"])
    # building a model of s million weights and timing its updates; peers' updates are slower
    seconds = sum((len(methods) + 3 * len(peers())) * (0.5 + (0.5 + 0.15 * level["realloc"]) * int(s) / 25)
                  for s in sizes)
    jobs.append(Job("reallocation", f"{' and '.join(sizes)}M weights", [
        PYTHON, "benchmarks/reallocation.py", "--device", args.device, "--sizes", *sizes, "--methods", *methods,
        "--peers", *([] if quick else peers()), "--repeats", str(level["realloc"]), "--threads", str(args.threads),
        "--output", str(raw / "reallocation.json")], args.startup + seconds, raw / "reallocation.json"))
    models = ["vit_base_mlp"] if quick else ["vit_base_mlp", "vit_base"]
    inference = Job("inference", "2:4 semi_structured", [
        PYTHON, "benchmarks/inference.py", "--device", args.device, "--models", *models, "--batches",
        "16" if quick else "256", "--formats", "semi_structured", "--half-dtypes", "float16", "bfloat16",
        "--repeats", str(level["inference"]), "--output", str(raw / "inference.json")],
        args.startup + len(models) * 2 * 2 * (3 + 0.05 * (3 + level["inference"])), raw / "inference.json")
    if not cuda:
        inference.status, inference.note = "skipped", "2:4 semi-structured kernels need an NVIDIA GPU (CUDA)"
    jobs.append(inference)
    if quick:
        return [*jobs, step_job(list(QUICK), False, args, level, raw), memory_job("test_resnet", args, raw),
                step_job(["test_vit"], True, args, level, raw)]
    eager = [step_job([m], False, args, level, raw) for m in FULL]
    resnet, vit_small, vit_base = (step_job([m], True, args, level, raw) for m in FULL)
    return [*jobs, *eager, memory_job("resnet50", args, raw), vit_small, memory_job("vit_base_patch16_224", args, raw),
            resnet, vit_base]


def fit(args: argparse.Namespace) -> tuple[list[Job], dict]:
    """The plan that runs the most important commands within the budget, with the largest repeat counts that do."""
    best: tuple[tuple[bool, ...], list[Job], dict] | None = None
    for level in [QUICK_LEVEL] if args.quick else LEVELS:
        jobs, total = plan(args, level), 0.0
        for job in jobs:
            if job.status == "planned" and job.part not in args.parts:
                job.status, job.note = "skipped", "not selected (--parts)"
            if job.status == "planned":
                if total + job.estimate_s > args.budget_s:  # in order: the most important come first
                    job.status, job.note = "skipped", over_budget(job, args.budget_s - total)
                else:
                    total += job.estimate_s
        included = tuple(j.status == "planned" for j in jobs)  # compared in order of importance
        if best is None or included > best[0]:
            best = (included, jobs, level)
    return best[1], best[2]


def over_budget(job: Job, left: float) -> str:
    return f"would not fit the budget: estimated {job.estimate_s:.0f} s, {max(0.0, left):.0f} s left"


def run(job: Job, env: dict[str, str], timeout: float, logs: Path) -> None:
    """Run one command in its own process group (killed whole at the timeout); its output goes to a log."""
    job.log = logs / f"{job.part}_{job.name.replace(' ', '_').replace(':', '')}.log"
    if job.output is not None:
        job.output.unlink(missing_ok=True)  # an earlier run's results must not pass for this one's
    start = time.perf_counter()
    with job.log.open("w") as log:
        process = subprocess.Popen(job.argv, cwd=ROOT, env=env | job.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            job.returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            job.status, job.note = "timed out", f"stopped after {timeout:.0f} s (estimated {job.estimate_s:.0f} s)"
    job.wall_s = time.perf_counter() - start
    if job.status == "timed out":
        return
    lines = [line for line in job.log.read_text(errors="replace").splitlines() if line.strip()]
    if job.returncode == 0 and job.output is not None and job.output.exists():
        job.status = "ok"
        job.load_results()
    else:
        job.status = "failed"
        job.note = f"exit status {job.returncode}: {lines[-1][:300] if lines else 'no output'}"
        if job.output is not None and job.output.exists():
            job.load_results()


def execute(jobs: list[Job], args: argparse.Namespace, env: dict[str, str]) -> float:
    """Run the planned commands in order (`args.jobs` at a time) within the budget; returns the seconds taken."""
    start, lock = time.perf_counter(), threading.Lock()
    progress = tqdm(total=len(jobs), desc="gpu suite", unit="command")

    def one(index: int) -> None:
        job = jobs[index]
        with lock:  # decide with the time really left, counting the commands that have not started yet
            left = args.budget_s - (time.perf_counter() - start)
            later = sum(j.estimate_s for j in jobs[index + 1:] if j.status == "planned")
            if job.status == "skipped" and job.note.startswith("would not fit") and job.estimate_s <= left - later:
                job.status, job.note = "planned", ""  # the commands before it took less than their estimates
            if job.status == "planned" and job.estimate_s > left:
                job.status, job.note = "skipped", over_budget(job, left)
            if job.status == "planned":
                job.status = "running"
        if job.status == "running":
            timeout = max(1.0, min(left, max(3 * job.estimate_s, job.estimate_s + 120)))  # the budget is the guard
            run(job, env, timeout, args.output_dir / "logs")
        with lock:
            progress.update()
            progress.write(f"[{job.status}] {job.part}: {job.name}" + (f" ({job.wall_s:.0f} s)" if job.wall_s else "")
                           + (f" - {job.note}" if job.note else ""))

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, range(len(jobs))))
    progress.close()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and batches, 1-2 repeats (CI-sized)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget in seconds")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_suite")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per command (default: up to 8)")
    parser.add_argument("--jobs", type=int, default=None, help="commands at a time (default: 2 in the quick CPU "
                        "form, where they mostly import; else 1, since timings that overlap disturb each other)")
    parser.add_argument("--plan-only", action="store_true", help="print the commands and estimates; run nothing")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir.resolve()
    args.jobs = args.jobs or (2 if args.quick and args.device == "cpu" else 1)
    args.threads = args.threads or min(8, os.cpu_count() or 1)
    args.startup = 8.0 if args.device == "cpu" else 10.0  # python, torch, timm (and a CUDA context)
    if args.device == "cpu" and not args.quick:
        parser.error("--device cpu needs --quick: the full form's models at batch 256 would take hours on a CPU")
    jobs, level = fit(args)
    if args.plan_only:
        for job in jobs:
            print(f"{job.status:8} {job.estimate_s:6.0f} s  {job.part}: {job.name}\n         {job.command()}")
        print(f"estimated {sum(j.estimate_s for j in jobs if j.status == 'planned'):.0f} s of {args.budget_s:.0f}; "
              f"repeats {level}")
        return 0
    info = machine_info(args.device, ROOT)  # exits with what to install when dst_prune cannot be imported
    if args.device == "cuda" and "gpu" not in info:
        print("CUDA is not available here; for the CPU form run: python benchmarks/gpu_suite.py --device cpu --quick",
              file=sys.stderr)
        return 2
    (args.output_dir / "raw").mkdir(parents=True, exist_ok=True)
    (args.output_dir / "logs").mkdir(exist_ok=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                        "PYTHONUNBUFFERED": "1"}
    wall = execute(jobs, args, env)
    exit_code = 1 if any(j.status in ("failed", "timed out") for j in jobs) else 0
    judged = args.device == "cuda" and not args.quick
    summary = write_reports(args.output_dir, jobs, targets(jobs, judged), info, {
        "form": f"{'quick' if args.quick else 'full'} on {args.device}", "budget_s": args.budget_s, "wall_s": wall,
        "repeats": level, "exit_code": exit_code, "arguments": {k: str(v) for k, v in vars(args).items()}})
    print(summary)
    print(f"wrote {args.output_dir}/summary.md, suite.json and one JSON per part", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
