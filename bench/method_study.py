"""What caff buys in accuracy: every method under each budget regime, tuned, several seeds.

For a task and one pretrained model (default Shakespeare on char-gpt-xs, pretrained on English):

1. **References** on the server's test set: the pretrained model (for Fashion-MNIST with only its
   fresh head trained, centrally) and centralized full fine-tuning on the pooled training data of
   every federated client (the upper bound). Headroom = upper bound - pretrained.
2. **Tuning**: each method's SGD learning rate, per regime, from ``--lr-grid``, and for the methods
   that may train LoRA adapters (caff, LoRA, FedRA) with each of LoRA's scales alpha / rank from
   ``--lora-scale-grid``, on the validation set (held-out samples of the federated clients disjoint
   from the test set), seeds ``--tune-seeds`` (default 0), ``--tune-rounds`` rounds; the lowest final
   validation loss (mean over the tuning seeds; a setting that diverges on any of them is out) wins, and
   while it is the lowest or highest rate (scale) tried, the next rate beyond it on the 1-3-10 ladder
   (the scale 4x beyond it) is tried too (twice at most). Never the test set.
3. **Runs**: every method with its learning rate, ``--seeds``, the same rounds, clients per round,
   local steps and batch; mean and 95 % interval (Student t) over seeds.

Regimes (budgets relative to full fine-tuning of the model at the study's batch, sgd; the
homogeneous ones budget the step's tensors, their devices naming a runtime of no footprint):
``mem-1/8``, ``mem-1/4``, ``mem-1/2`` (memory binds; compute and upload ample), ``upload-1/32``,
``upload-1/8`` (upload binds; memory ample), ``compute-1/4`` (FLOPs per round bind), and
``edge-mix`` (the catalogue's heterogeneous fleet, budgets as the catalogue states them).

Each finished run is saved (``OUT/runs/<regime>/<method>-lr<lr>[-s<scale>]-r<rounds>-<phase><seed>/``) and skipped
when the study is run again; a longer run starts from the end of a finished shorter one (same
settings and plan); ``--jobs N`` runs N at a time in worker processes, and separate
invocations with different ``--regimes`` can run side by side on one ``--out``. Writes
``REPORT/study.md`` (tables, claims) and ``REPORT/<regime>.png`` (accuracy against rounds, uploaded
bytes and client FLOPs; ``--report`` defaults to OUT), and prints the CPU time spent.

    nice -n 10 python bench/method_study.py --out study/shakespeare --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from costmodel.build import LORA_SCALE

METHODS = ("caff", "lora", "full", "head", "fedra")
#: caff with issue 13's memory tools (opt in with --methods): the planner may also recompute trained blocks
#: (``caff+recompute``), or caff's own plans run with every frozen linear weight in int8 (``caff+int8``: same
#: blocks, the accuracy cost of int8 frozen weights), or planned with both on the menu (``caff+recompute+int8``:
#: the planner may recompute trained blocks and hold frozen weights in int8, to fit more in the same memory).
#: LoRA gets the same tools (``lora+recompute``, ``lora+recompute+int8``: `trainer.methods`, the largest rank
#: that fits with the tools of the plan's menu).
#: name -> (engine method, PlanSettings fields, frozen format)
VARIANTS = {"caff+recompute": ("caff", {"recompute": True}, None), "caff+int8": ("caff", {}, "int8"),
            "caff+recompute+int8": ("caff", {"recompute": True, "frozen": ("int8",)}, None),
            "lora+recompute": ("lora", {"recompute": True}, None),
            "lora+recompute+int8": ("lora", {"recompute": True, "frozen": ("int8",)}, None)}
REGIMES = ("mem-1/8", "mem-1/4", "mem-1/2", "upload-1/32", "upload-1/8", "compute-1/4", "edge-mix")
#: how many times tuning may step past the grid's edge while the best rate sits on it
GRID_EXTENSIONS = 2
#: engine methods whose plans may hold LoRA adapters, whose scale (alpha / rank) is tuned with the rate
LORA_METHODS = ("caff", "lora", "fedra")
#: factor between LoRA scales tried past the grid's edge
SCALE_STEP = 4.0
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def tensors_only_runtime(out: Path) -> Path:
    """A runtime profile of no footprint, so a homogeneous regime's memory budgets the step's tensors
    only, as the paper's memory limits do (a real device adds its runtime: see ``caff calibrate``)."""
    path = out / "tensors-only-runtime.json"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "name": "tensors-only", "footprint_bytes": 0, "lora_bytes": 0,
            "description": "the study's homogeneous regimes budget the step's tensors only",
            "source": {"machine": "none", "method": "not measured: a budget on tensors alone", "torch": "any",
                       "python": "any", "date": "2026-11-30", "repetitions": 1}}))
    return path


def devices(regime: str, spec, task: str, n: int, batch: int, steps: int, runtime: Path):
    """The regime's fleet of ``n`` devices, budgets relative to full fine-tuning's (tensors only)."""
    from costmodel import TrainMode, estimate
    from profiles import DeviceSpec, load_fleet
    from trainer.engine import TASK_SEQ

    if regime == "edge-mix":
        return load_fleet("edge-mix").expand(n, seed=0)
    full = estimate(spec, TrainMode.parse("all", spec.n_blocks), batch, TASK_SEQ[task])
    flops = steps * (full.totals["fwd_flops"] + full.totals["bwd_flops"])
    budgets = {"memory_bytes": 4 * full.peak_bytes, "compute_flops": 10 * flops,
               "upload_bytes": 10 * full.totals["upload_bytes"]}
    kind, share = regime.split("-")
    key = {"mem": "memory_bytes", "upload": "upload_bytes", "compute": "compute_flops"}[kind]
    budgets[key] = {"mem": full.peak_bytes, "upload": full.totals["upload_bytes"], "compute": flops}[kind] \
        / int(share.split("/")[1])
    budgets = {k: (v if k == "compute_flops" else int(v)) for k, v in budgets.items()}
    return [DeviceSpec(name=f"{kind}#{i}", local_steps=steps, batch_size=batch, runtime=str(runtime), **budgets)
            for i in range(n)]


def _run_one(job: dict) -> dict:
    """One federated run in this (worker) process; its summary, also saved as ``done.json``."""
    import torch

    torch.set_num_threads(1)
    from costmodel import ZOO, TrainMode
    from planner.fleet import PlanSettings, plan
    from trainer.engine import TASK_SEQ, TrainConfig, run
    from trainer.methods import device_task
    from trainer.rundir import plan_digest

    out = Path(job["out"])
    if (out / "done.json").exists():
        return json.loads((out / "done.json").read_text())
    cpu = time.process_time()
    spec = ZOO[job["model"]]
    fleet = devices(job["regime"], spec, job["task"], job["devices"], job["batch"], job["steps"],
                    tensors_only_runtime(Path(job["out"]).parents[2]))
    method, settings, frozen = VARIANTS.get(job["method"], (job["method"], {}, None))
    planned = plan([spec], fleet, PlanSettings(seq=TASK_SEQ[job["task"]], lora_ranks=(2, 4, 8, 16), **settings))
    if frozen:
        planned = planned.model_copy(update={"devices": [d if d.mode is None else d.model_copy(update={
            "mode": str(TrainMode.parse(f"{d.mode}+frozen:{frozen}", spec.n_blocks))}) for d in planned.devices]})
    config = TrainConfig(**job["config"] | {"method": method})
    if job["phase"] == "run" and not (out / "state.json").exists():
        _start_from_shorter(out, config, plan_digest(planned))
    try:
        assigned = [task[0] for task in (device_task(method, spec, d, planned, 0) for d in planned.devices) if task]
        if not assigned:
            raise ValueError("no device can afford it")  # each would sit out every round: nothing to train
        if config.lora_scale != LORA_SCALE and not any(mode.lora for mode in assigned):
            raise ValueError("no device trains a LoRA adapter: its scale changes nothing")
        metrics = run(config, planned, out, resume=(out / "state.json").exists())
    except ValueError as why:
        summary = {**job, "error": str(why)}
    else:
        summary = {**job, "rounds": [{k: m.get(k) for k in ("round", "test_loss", "test_accuracy", "unseen_loss",
                                                            "unseen_accuracy", "uploaded_bytes", "flops")}
                                     | {"trained": sum(c["status"] == "trained" for c in m["clients"]),
                                        "modes": sorted({c["mode"] for c in m["clients"] if "mode" in c})}
                                     for m in metrics]}
    summary["cpu_seconds"] = time.process_time() - cpu
    out.mkdir(parents=True, exist_ok=True)
    (out / "done.json").write_text(json.dumps(summary))
    return summary


def _start_from_shorter(out: Path, config, plan_sha256: str) -> None:
    """Start the run in ``out`` (``config``, a `TrainConfig`) from the longest finished shorter run of the
    same settings and plan (SHA-256), if any: the engine draws each round's clients and batches from
    (seed, round, device), so that run's rounds are this run's first ones. Copies its directory and
    records the longer run's rounds in its state; the engine resumes from there (checking its weights
    and metrics as usual)."""
    def same_but_shorter(run: Path) -> int:
        """The rounds of the finished run in ``run`` if it is this one cut short, else 0."""
        if not (run / "done.json").exists() or not (run / "state.json").exists():
            return 0
        try:
            state = json.loads((run / "state.json").read_text())
            rounds = state["config"]["rounds"]
            same = state["plan_sha256"] == plan_sha256 and state["config"] == config.model_dump() | {"rounds": rounds}
        except (OSError, ValueError, KeyError, TypeError):  # an unreadable or foreign state: not a run to continue
            return 0
        return rounds if same and isinstance(rounds, int) and rounds < config.rounds else 0

    shorter = max(((same_but_shorter(run), run) for run in out.parent.glob("*-run*")), default=(0, None))
    if shorter[0]:
        shutil.copytree(shorter[1], out, ignore=shutil.ignore_patterns("done.json"))
        state = json.loads((out / "state.json").read_text())
        state["config"]["rounds"] = config.rounds
        (out / "state.json").write_text(json.dumps(state))


def _execute(jobs: list[dict], workers: int, label: str, report_only: bool = False) -> list[dict]:
    """Run ``jobs`` not yet done (none when ``report_only``); the summaries of all that are done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done = [json.loads((Path(j["out"]) / "done.json").read_text()) for j in jobs if (Path(j["out"]) / "done.json").exists()]
    todo = [] if report_only else [j for j in jobs if not (Path(j["out"]) / "done.json").exists()]
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}")) as bar:
        task = bar.add_task(label, total=len(jobs), completed=len(done), last="")
        if workers > 1 and len(todo) > 1:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(_run_one, j) for j in todo]):
                    done.append(future.result())
                    bar.update(task, advance=1, last=_brief(done[-1]))
        else:
            for job in todo:
                done.append(_run_one(job))
                bar.update(task, advance=1, last=_brief(done[-1]))
    return done


def _brief(summary: dict) -> str:
    tail = summary.get("error") or f"loss {summary['rounds'][-1]['test_loss']:.3f}"
    lr, scale = _setting(summary)
    return f"{summary['regime']} {summary['method']} lr {lr:g} α/r {scale:g}: {tail} ({summary['cpu_seconds']:.0f} s)"


def cached_references(args) -> dict:
    """`trainer.reference.references` for the study's task and model, computed once per ``--out``."""
    path = Path(args.out) / "references.json"
    if path.exists():
        return json.loads(path.read_text())
    from costmodel import ZOO
    from trainer.reference import references

    refs = references(args.task, ZOO[args.model], args.central_steps, args.central_batch, args.central_lr,
                      args.eval_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(refs, indent=1))
    return refs


def _job(args, regime: str, method: str, lr: float, phase: str, seed: int, lora_scale: float = LORA_SCALE) -> dict:
    rounds = args.tune_rounds if phase == "tune" else args.rounds
    config = {"task": args.task, "method": method, "rounds": rounds, "clients_per_round": args.clients,
              "local_steps": args.steps, "lr": lr, "lora_scale": lora_scale, "seed": seed,
              "eval_every": args.eval_every if phase == "run" else rounds,
              "eval_split": "validation" if phase == "tune" else "test", "eval_samples": args.eval_samples}
    scale = "" if lora_scale == LORA_SCALE else f"-s{lora_scale:g}"
    name = f"{method}-lr{lr:g}{scale}-r{rounds}-{phase}{seed}"  # a run of other rounds is another run
    return {"regime": regime, "method": method, "phase": phase, "task": args.task, "model": args.model,
            "devices": args.devices, "batch": args.batch, "steps": args.steps, "config": config,
            "out": str(Path(args.out) / "runs" / regime.replace("/", "-") / name)}


def _setting(run: dict) -> tuple[float, float]:
    """(learning rate, LoRA scale) of a run."""
    return run["config"]["lr"], run["config"].get("lora_scale", LORA_SCALE)


def _tuned(tuning: list[dict], regime: str,
           method: str) -> tuple[tuple[float, float] | None, list[tuple[float, float]]]:
    """The (learning rate, LoRA scale) of the lowest final validation loss, mean over the tuning seeds
    (None if none trained on every seed), and every setting tried. A setting whose run on some seed
    failed, diverged or never trained cannot win."""
    runs_of: dict[tuple[float, float], list[dict]] = {}
    for t in tuning:
        if t["regime"] == regime and t["method"] == method:
            runs_of.setdefault(_setting(t), []).append(t)

    def loss(t: dict) -> float:
        final = t["rounds"][-1]["test_loss"] if "error" not in t else None
        trained = "error" not in t and any(x["trained"] for x in t["rounds"])
        return final if trained and final is not None and math.isfinite(final) else math.inf

    scored = [(statistics.mean(loss(t) for t in runs), setting) for setting, runs in runs_of.items()]
    best = min((x for x in scored if math.isfinite(x[0])), default=None)
    return (best[1] if best else None), sorted(setting for setting, runs in runs_of.items()
                                               if all("error" not in t for t in runs))


def _grid_step(lr: float, down: bool) -> float:
    """The next rate on the 1-3-10 ladder below or above ``lr`` (0.03 -> 0.01, 1 -> 3)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    ladder = [float(f"{m * 10.0 ** e:g}") for e in (exponent - 1, exponent, exponent + 1) for m in (1, 3)]
    return max(v for v in ladder if v < lr * 0.99) if down else min(v for v in ladder if v > lr * 1.01)


def _beyond_edge(best: tuple[float, float], tried: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Settings one step past the grid's edge where the best one sits on it: the learning rate on the
    1-3-10 ladder (at the best scale), the LoRA scale by ``SCALE_STEP`` (at the best rate)."""
    lr, scale = best
    rates = sorted(r for r, s in tried if s == scale)
    scales = sorted(s for r, s in tried if r == lr)
    out = []
    if len(rates) > 1 and lr in (rates[0], rates[-1]):
        out.append((_grid_step(lr, lr == rates[0]), scale))
    if len(scales) > 1 and scale in (scales[0], scales[-1]):
        out.append((lr, scale / SCALE_STEP if scale == scales[0] else scale * SCALE_STEP))
    return out


def tune(args, regimes: list[str], methods: list[str], grid: list[float],
         scales: list[float]) -> tuple[dict, list[dict]]:
    """Each (regime, method)'s (learning rate, LoRA scale), and the tuning runs' summaries. The grid is
    every rate times every scale for a method that may train LoRA adapters (caff, LoRA, FedRA; a plan
    with no adapter refuses a scale other than the default, `_run_one`), every rate at the default scale
    for the others; then, while the best setting sits on the edge of what was tried, one step beyond it
    (`_beyond_edge`, at most ``GRID_EXTENSIONS`` times), so that no method is held at the grid's edge."""
    def scales_of(method: str) -> list[float]:
        return scales if VARIANTS.get(method, (method,))[0] in LORA_METHODS else [LORA_SCALE]

    tuning = _execute([_job(args, g, m, lr, "tune", seed, s) for g in regimes for m in methods for lr in grid
                       for s in scales_of(m) for seed in args.tune_seeds], args.jobs, "tuning", args.report_only)
    for _ in range(GRID_EXTENSIONS):
        beyond = []
        for regime in regimes:
            for method in methods:
                best, tried = _tuned(tuning, regime, method)
                if best is not None:
                    beyond += [_job(args, regime, method, lr, "tune", seed, s) for lr, s in _beyond_edge(best, tried)
                               for seed in args.tune_seeds]
        if not beyond:
            break
        tuning += _execute(beyond, args.jobs, "tuning beyond the grid's edge", args.report_only)
    return {(g, m): _tuned(tuning, g, m)[0] or (grid[0], LORA_SCALE) for g in regimes for m in methods}, tuning


def _mean_ci(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], float("nan")
    return statistics.mean(values), T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def _fmt(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not all(math.isfinite(v) for v in values):  # a diverged seed's loss (inf, nan) has no mean
        return f"diverged in {sum(not math.isfinite(v) for v in values)} of {len(values)} seeds"
    mean, half = _mean_ci([v * scale for v in values])
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def summarize(args, refs: dict, runs: list[dict]) -> tuple[str, dict]:
    """The README's tables for these runs (markdown) and {regime: {method: final accuracies, or None when
    no device could run it}}."""
    from profiles import format_bytes, format_flops

    pre, top = refs["pretrained"], refs["upper_bound"]
    headroom = top["accuracy"] - pre["accuracy"]
    lines = [f"Task {args.task}, model {args.model}; test set {refs['test_samples']} samples. Pretrained: loss "
             f"{pre['loss']:.3f}, accuracy {pre['accuracy']:.2%}; centralized full fine-tuning (upper bound): loss "
             f"{top['loss']:.3f}, accuracy {top['accuracy']:.2%}; headroom {100 * headroom:.2f} points "
             f"({pre['loss'] - top['loss']:.3f} nats). {args.rounds} rounds x {args.clients} clients x {args.steps} "
             f"local steps of batch {args.batch} (sgd), {args.devices} devices; seeds {_listed(args.seeds)}; "
             f"mean ± 95 % interval over seeds; lr per regime and method chosen on the validation set from "
             f"{_listed(args.lr_grid)}, with LoRA's scale α/r from {_listed(args.lora_scale_grid)} for the methods "
             f"that may train LoRA adapters (stepping past the grid's edge, rates on the 1-3-10 ladder and scales "
             f"by {SCALE_STEP:g}x, while the best setting sat on it).", ""]
    finals: dict[str, dict[str, list[float]]] = {}
    for regime in args.regimes.split(","):
        lines += [f"**{regime}**", "", "| method | lr (α/r) | trains | clients trained/round | accuracy | loss | "
                  "headroom recovered | unseen clients' accuracy | upload/round | client FLOPs/round |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for method in args.methods.split(","):
            mine = [r for r in runs if r["regime"] == regime and r["method"] == method and r["phase"] == "run"]
            if not mine:
                lines.append(f"| {method} | | | | not run | | | | | |")
                continue
            if any("error" in r for r in mine) or not any(x["trained"] for r in mine for x in r["rounds"]):
                why = next((r["error"] for r in mine if "error" in r), "no device can afford it")
                lines.append(f"| {method} | | cannot run: {why} | 0 | | | | | | |")
                finals.setdefault(regime, {})[method] = None
                continue
            last = [r["rounds"][-1] for r in mine]
            acc = [x["test_accuracy"] for x in last]
            finals.setdefault(regime, {})[method] = acc
            modes = sorted({m for r in mine for x in r["rounds"] for m in x["modes"]})
            per_round = [x for r in mine for x in r["rounds"]]
            lines.append(
                f"| {method} | {_setting_text(mine[0], modes)} | {', '.join(modes)[:60]} | "
                f"{statistics.mean(x['trained'] for x in per_round):.1f} | {_fmt(acc, 100, 2)} % | "
                f"{_fmt([x['test_loss'] for x in last])} | "
                f"{_fmt([(a - pre['accuracy']) / headroom for a in acc], 100, 0)} % | "
                f"{_fmt([x['unseen_accuracy'] for x in last], 100, 2)} % | "
                f"{format_bytes(statistics.mean(x['uploaded_bytes'] for x in per_round))} | "
                f"{format_flops(statistics.mean(x['flops'] for x in per_round))} |")
        lines.append("")
    return "\n".join(lines), finals


def _setting_text(run: dict, modes: list[str]) -> str:
    """A run's learning rate, and its LoRA scale where its devices trained LoRA adapters."""
    lr, scale = _setting(run)
    return f"{lr:g}" + (f" (α/r {scale:g})" if any("lora" in m for m in modes) else "")


def participation(runs: list[dict]) -> dict[str, tuple[int, int]]:
    """Per device class (a device's name before ``#``): (rounds in which its update entered the global
    model, rounds in which it was sampled), summed over ``runs``, read from each run's metrics."""
    counts: dict[str, list[int]] = {}
    for run in runs:
        for line in (Path(run["out"]) / "metrics.jsonl").read_text().splitlines():
            for client in json.loads(line)["clients"]:
                seen = counts.setdefault(client["device"].split("#")[0], [0, 0])
                seen[0] += client["status"] == "trained"
                seen[1] += 1
    return {name: (trained, sampled) for name, (trained, sampled) in sorted(counts.items())}


def fairness_table(args, runs: list[dict]) -> tuple[str, dict]:
    """Per regime with more than one device class, the share of sampled rounds in which each class's
    update entered the global model, per method (markdown), and {regime: {method: least share}}."""
    lines, least = [], {}
    for regime in args.regimes.split(","):
        shares = {m: participation([r for r in runs if r["regime"] == regime and r["method"] == m
                                    and r["phase"] == "run" and "error" not in r])
                  for m in args.methods.split(",")}
        shares = {m: by_class for m, by_class in shares.items() if by_class}
        classes = sorted({c for by_class in shares.values() for c in by_class})
        if len(classes) < 2:
            continue
        lines += [f"**{regime}: device contributions** (rounds in which a class's update entered the global model, "
                  "of the rounds it was sampled; all seeds)", "",
                  "| device class | " + " | ".join(shares) + " |", "|---|" + "---:|" * len(shares)]
        for name in classes:
            cells = [f"{t / n:.0%} ({t}/{n})" if (t, n) != (0, 0) else "" for t, n in
                     (by_class.get(name, (0, 0)) for by_class in shares.values())]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        least[regime] = {m: min(t / n for t, n in by_class.values()) for m, by_class in shares.items()}
    return "\n".join(lines), least


def claims(finals: dict, refs: dict, least_share: dict) -> str:
    """The paper's claims against our numbers: reproduced, not reproduced, or not run."""
    pre, top = refs["pretrained"]["accuracy"], refs["upper_bound"]["accuracy"]

    def mean(regime, method):
        values = finals.get(regime, {}).get(method)
        return None if values is None else statistics.mean(values)

    def blocked(regime, method):
        return method in finals.get(regime, {}) and finals[regime][method] is None

    def best_other(regime):
        others = {m: mean(regime, m) for m in ("lora", "full", "fedra") if mean(regime, m) is not None}
        return max(others.items(), key=lambda kv: kv[1]) if others else None

    def all_baselines_done(regime):
        return all(m in finals.get(regime, {}) for m in ("lora", "full", "fedra"))

    def overlap(regime, a, b):
        """Whether the 95 % intervals over seeds of methods a and b overlap (not with one seed)."""
        (mean_a, ci_a), (mean_b, ci_b) = (_mean_ci(finals[regime][m]) for m in (a, b))
        return abs(mean_a - mean_b) <= ci_a + ci_b

    rows = ["| claim | regime | verdict | our numbers (final test accuracy, mean over seeds) |", "|---|---|---|---|"]
    for claim, regimes in (("higher accuracy than the state of the art under memory limits",
                            ("mem-1/8", "mem-1/4", "mem-1/2")),
                           ("higher accuracy under compute limits", ("compute-1/4",)),
                           ("higher accuracy on a heterogeneous fleet", ("edge-mix",))):
        for regime in regimes:
            caff, other = mean(regime, "caff"), best_other(regime)
            if blocked(regime, "caff") and all_baselines_done(regime):
                rows.append(f"| {claim} | {regime} | " + (f"not reproduced | caff cannot run; best of lora/full/fedra: "
                            f"{other[0]} {other[1]:.2%} |" if other else "cannot be tested: no method can run | |"))
                continue
            if caff is None or not all_baselines_done(regime):
                rows.append(f"| {claim} | {regime} | not run | |")
                continue
            verdict = "reproduced" if other is None or caff > other[1] else "not reproduced"
            if other is not None and overlap(regime, "caff", other[0]):
                verdict += ", not significant (95 % intervals overlap)"
            against = "no baseline can run" if other is None else f"best of lora/full/fedra: {other[0]} {other[1]:.2%}"
            rows.append(f"| {claim} | {regime} | {verdict} | caff {caff:.2%}; {against} |")
    for regime in ("upload-1/32", "upload-1/8"):
        caff, lora = mean(regime, "caff"), mean(regime, "lora")
        if caff is not None and blocked(regime, "lora"):
            rows.append(f"| on par with LoRA under upload limits (within 1 point) | {regime} | cannot be tested: no "
                        f"device can upload LoRA's smallest rank | caff {caff:.2%}, lora cannot run |")
            continue
        if caff is None or lora is None:
            rows.append(f"| on par with LoRA under upload limits (within 1 point) | {regime} | not run | |")
            continue
        verdict = "reproduced" if abs(caff - lora) <= 0.01 or caff > lora else "not reproduced"
        rows.append(f"| on par with LoRA under upload limits (within 1 point) | {regime} | {verdict} | "
                    f"caff {caff:.2%}, lora {lora:.2%} |")
    expectation = "issue 11's expectation: caff recovers half the headroom where LoRA and full cannot run"
    for regime in ("mem-1/8", "mem-1/4"):
        caff = mean(regime, "caff")
        if blocked(regime, "caff"):
            rows.append(f"| {expectation} | {regime} | not reproduced | caff cannot run: no device can afford its plan |")
            continue
        if caff is None:
            rows.append(f"| {expectation} | {regime} | not run | |")
            continue
        share = (caff - pre) / (top - pre)
        cannot = [m for m in ("lora", "full") if blocked(regime, m)]
        verdict = "reproduced" if share >= 0.5 and len(cannot) == 2 else "not reproduced"
        rows.append(f"| {expectation} | {regime} | {verdict} | caff recovers {share:.0%} of the headroom; cannot run: "
                    f"{', '.join(cannot) or 'none'} |")
    for regime in ("edge-mix",):
        shares = least_share.get(regime, {})
        others = {m: v for m, v in shares.items() if m in ("lora", "full", "fedra")}
        if "caff" not in shares or not all_baselines_done(regime):
            rows.append(f"| fairer device contributions (the least-served device class's share of its sampled "
                        f"rounds that entered the model) | {regime} | not run | |")
            continue
        verdict = "reproduced" if all(shares["caff"] > v for v in others.values()) else "not reproduced"
        rows.append(f"| fairer device contributions (the least-served device class's share of its sampled rounds "
                    f"that entered the model) | {regime} | {verdict} | caff {shares['caff']:.0%}; "
                    + ", ".join(f"{m} {v:.0%}" for m, v in others.items()) + " |")
    return "\n".join(rows)


def plot(args, refs: dict, runs: list[dict]) -> list[str]:
    """One PNG per regime: test accuracy against rounds, cumulative upload and cumulative client FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import NullFormatter

    written = []
    for regime in args.regimes.split(","):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for method in args.methods.split(","):
            mine = [r for r in runs if r["regime"] == regime and r["method"] == method and r["phase"] == "run"
                    and "error" not in r and any(x["trained"] for x in r["rounds"])]
            if not mine:
                continue
            rounds = [x["round"] for x in mine[0]["rounds"] if x["test_accuracy"] is not None]
            accuracy, half = zip(*(_mean_ci([next(x["test_accuracy"] for x in r["rounds"] if x["round"] == k)
                                             for r in mine]) for k in rounds))
            low, high = (np.array(accuracy) + sign * np.nan_to_num(half) for sign in (-1, 1))
            cumulative = {key: [statistics.mean(sum(x[key] for x in r["rounds"] if x["round"] <= k) for r in mine)
                                for k in rounds] for key in ("uploaded_bytes", "flops")}
            for axis, xs in zip(axes, (rounds, cumulative["uploaded_bytes"], cumulative["flops"])):
                line, = axis.plot(xs, accuracy, marker="o", markersize=3, label=method)
                axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        for axis, label in zip(axes, ("round", "uploaded bytes (all clients, cumulative)",
                                      "client FLOPs (cumulative)")):
            axis.axhline(refs["pretrained"]["accuracy"], color="gray", linestyle=":", label="pretrained")
            axis.axhline(refs["upper_bound"]["accuracy"], color="black", linestyle="--", label="central full FT")
            axis.set_xlabel(label)
            axis.set_ylabel("test accuracy")
            if label != "round":
                axis.set_xscale("log")
                axis.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{args.task}, {args.model}, {regime} (mean over seeds {_listed(args.seeds)}, shaded: 95 % "
                     "interval)")
        fig.tight_layout()
        path = Path(args.report) / f"{regime.replace('/', '-')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written


def _listed(values: list) -> str:
    return ",".join(f"{v:g}" for v in values)


def _numbers(kind):
    """An argparse type: comma-separated numbers of ``kind`` (rates and scales: positive)."""
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not comma-separated {kind.__name__}s: {text!r}") from None
        if kind is float and not all(0 < v < math.inf for v in values):
            raise argparse.ArgumentTypeError(f"not all positive and finite: {text!r}")
        return values
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="shakespeare", choices=["shakespeare", "fashion-mnist"])
    parser.add_argument("--model", default=None, help="default: char-gpt-xs (Shakespeare), vit-tiny")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tune-rounds", type=int, default=10)
    parser.add_argument("--tune-seeds", default=[0], type=_numbers(int),
                        help="seeds of each tuning run; a setting is scored by its mean validation loss over them")
    parser.add_argument("--clients", type=int, default=5, help="clients per round")
    parser.add_argument("--steps", type=int, default=8, help="local steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--devices", type=int, default=40)
    parser.add_argument("--seeds", default=[0, 1, 2], type=_numbers(int))
    parser.add_argument("--lr-grid", default=[0.03, 0.1, 0.3], type=_numbers(float))
    parser.add_argument("--lora-scale-grid", default=[0.5, 2.0, 8.0], type=_numbers(float),
                        help="LoRA scales alpha / rank tried with each rate for caff, LoRA and FedRA")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the whole test set")
    parser.add_argument("--central-steps", type=int, default=600)
    parser.add_argument("--central-batch", type=int, default=32)
    parser.add_argument("--central-lr", type=float, default=1e-3)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--out", default="study/shakespeare")
    parser.add_argument("--report-only", action="store_true", help="write tables and plots of the finished runs only")
    parser.add_argument("--report", default=None, help="folder for study.md and the plots (default: --out)")
    args = parser.parse_args()
    args.model = args.model or {"shakespeare": "char-gpt-xs", "fashion-mnist": "vit-tiny"}[args.task]
    args.report = args.report or args.out
    bad = set(args.regimes.split(",")) - set(REGIMES) or set(args.methods.split(",")) - set(METHODS) - set(VARIANTS)
    if bad:
        parser.error(f"unknown regime or method: {', '.join(sorted(bad))}")
    for folder in (args.out, args.report):
        if Path(folder).exists() and not Path(folder).is_dir():
            parser.error(f"{folder} is a file, not a folder")
    import torch

    torch.set_num_threads(1)
    started, wall = time.process_time(), time.perf_counter()
    refs = cached_references(args)
    print(f"pretrained {refs['pretrained']}, upper bound {refs['upper_bound']}", flush=True)
    regimes, methods = args.regimes.split(","), args.methods.split(",")
    tuned, tuning = tune(args, regimes, methods, args.lr_grid, args.lora_scale_grid)
    runs = _execute([_job(args, g, m, tuned[(g, m)][0], "run", s, tuned[(g, m)][1]) for g in regimes
                     for m in methods for s in args.seeds],
                    args.jobs, "runs", args.report_only)
    table, finals = summarize(args, refs, runs)
    fairness, least_share = fairness_table(args, runs)
    text = f"{table}\n{fairness}\n{claims(finals, refs, least_share)}\n"
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / "study.md").write_text(text)
    print(text)
    print(f"plots: {', '.join(plot(args, refs, runs))}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - started + children.ru_utime + children.ru_stime
    recorded = sum(r["cpu_seconds"] for r in tuning + runs)
    print(f"CPU time: {cpu:.0f} s in this invocation ({time.perf_counter() - wall:.0f} s wall); "
          f"{recorded:.0f} s recorded by all {len(tuning) + len(runs)} runs, earlier invocations included "
          f"(+{refs['central_cpu_seconds']:.0f} s central fine-tuning)", flush=True)


if __name__ == "__main__":
    main()
