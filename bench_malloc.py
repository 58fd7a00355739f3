"""Seconds per demo SFT and GRPO step with glibc's malloc defaults against cello.keep_freed_memory().

Not a test: it prints figures for BENCHMARKS.md. It runs the real sft.py and grpo.py on the demo's
files for a few steps in child processes, alternately as they are (on CPU they call
cello.keep_freed_memory) and with keep_freed_memory replaced by a no-op (glibc's defaults: freed
blocks go back to the kernel). From each run it reads metrics.jsonl: the mean seconds per step after
the first --warmup steps, the last step's loss or reward, which must be the same either way (only
where memory comes from differs), and the child's minor page faults (the whole run, start-up
included: ~200,000 of them are imports and loading).

Run after `python cello.py demo` (2 repeats: about 5 minutes on the 2-core machine):
    python bench_malloc.py --demo-dir runs/demo --work-dir runs/bench-malloc
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys

import cello

# The child: "python -c LAUNCH MODE SCRIPT FLAGS...", SCRIPT run as its own __main__.
LAUNCH = """import runpy, sys
import cello
mode, sys.argv = sys.argv[1], sys.argv[2:]
if mode == "glibc defaults":
    cello.keep_freed_memory = lambda: False
runpy.run_path(sys.argv[0], run_name="__main__")
"""
MODES = ("glibc defaults", "keep_freed_memory")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=cello.HelpFormatter)
parser.add_argument("--demo-dir", default="runs/demo", help="a finished demo run: its puzzles, traces and SFT model")
parser.add_argument("--work-dir", required=True, help="folder for the runs' outputs (replaced run by run)")
parser.add_argument("--sft-steps", type=int, default=80, help="SFT steps per run (from the small preset's init)")
parser.add_argument("--grpo-steps", type=int, default=12, help="GRPO steps per run (from the demo's SFT model)")
parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the mean")
parser.add_argument("--repeats", type=int, default=2, help="rounds; each runs both modes, one after the other")
args = parser.parse_args()
cello.check_ranges("bench_malloc.py", args, {"--sft-steps": "an integer >= 1", "--grpo-steps": "an integer >= 1",
                                             "--warmup": "an integer >= 0", "--repeats": "an integer >= 1"})
if args.warmup >= min(args.sft_steps, args.grpo_steps):
    sys.exit(f"bench_malloc.py: error: --warmup {args.warmup}: expected fewer than --sft-steps and --grpo-steps "
             "(the mean is over the steps after it)")
work, demo_root = os.path.realpath(args.work_dir), os.path.realpath(args.demo_dir)
if work == demo_root or work.startswith(demo_root + os.sep):  # its sft/ and grpo/ would replace the demo's
    sys.exit(f"bench_malloc.py: error: --work-dir {args.work_dir} is inside --demo-dir {args.demo_dir}: the runs "
             "would overwrite the demo's models; choose a folder of its own")
print("command: python " + " ".join(sys.argv))

demo = args.demo_dir
scripts = {
    "sft": ["sft.py", "--data", f"{demo}/distill/sft.jsonl", "--model", "small", "--max-steps", str(args.sft_steps),
            "--eval-every", "100000", "--save-every", "100000"],
    "grpo": ["grpo.py", "--model", f"{demo}/sft/final", "--train", f"{demo}/puzzles/train.jsonl",
             "--steps", str(args.grpo_steps), "--eval-every", "0", "--save-every", "100000"],
}


def run(mode, name):
    """One child run: (mean seconds per step after the warm-up, last loss or reward, minor page faults)."""
    out_dir = os.path.join(args.work_dir, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    child = subprocess.run([sys.executable, "-c", LAUNCH, mode, *scripts[name], "--out-dir", out_dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if child.returncode != 0:  # the child's own last line says why (a missing demo file, ...)
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"bench_malloc.py: {name} ({mode}) failed with exit {child.returncode}: {last}")
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
    rows = [r for r in cello.read_jsonl(os.path.join(out_dir, "metrics.jsonl")) if "tokens_per_s" in r]
    seconds = [r["time_step"] if name == "grpo" else r["tokens"] / r["tokens_per_s"] for r in rows[args.warmup:]]
    return statistics.mean(seconds), rows[-1]["reward_mean" if name == "grpo" else "loss"], faults


results = {(mode, name): [] for mode in MODES for name in scripts}
for round_ in range(args.repeats):
    for name in scripts:
        for mode in MODES:
            results[mode, name].append(run(mode, name))
            seconds, last, faults = results[mode, name][-1]
            print(f"round {round_ + 1}, {name:4s}, {mode:17s}: {seconds:.3f} s per step, last "
                  f"{'reward' if name == 'grpo' else 'loss'} {last:.6f}, {faults:,} minor page faults", flush=True)

print(f"\nmedians over {args.repeats} round(s), steps after the first {args.warmup}:")
for name in scripts:
    base, kept = (statistics.median(r[0] for r in results[mode, name]) for mode in MODES)
    same = all(a[1] == b[1] for a, b in zip(results[MODES[0], name], results[MODES[1], name]))
    print(f"  {name:4s}: glibc defaults {base:.3f} s, keep_freed_memory {kept:.3f} s per step: {kept / base:.2f}x; "
          f"the same last {'reward' if name == 'grpo' else 'loss'} in every round: {same}")
